/* The few calls s3dedup makes into ISA-L's inflater. ISA-L's state is a large struct whose
 * layout belongs to the installed header, so it stays on this side: Rust holds a pointer. */
#include <stdint.h>
#include <stdlib.h>
#include <isa-l/igzip_lib.h>

struct inflate_state *s3dedup_isal_new(void)
{
	struct inflate_state *s = malloc(sizeof *s);
	if (s != NULL) {
		isal_inflate_init(s);
		/* Headers are parsed in Rust (ISA-L 2.30 misreads one with two optional fields split
		 * across calls); ISA-L checks the trailer's CRC and size. */
		s->crc_flag = ISAL_GZIP_NO_HDR_VER;
	}
	return s;
}

void s3dedup_isal_free(struct inflate_state *s)
{
	free(s);
}

/* Ready for the next gzip member of the same body. */
void s3dedup_isal_next_member(struct inflate_state *s)
{
	isal_inflate_reset(s);
	s->crc_flag = ISAL_GZIP_NO_HDR_VER;
}

/* Inflates from in[..*in_len] into out[..*out_len]; leaves in *in_len and *out_len what is left
 * of each, in *done whether the member ended (its trailer checked). Returns ISA-L's code. */
int s3dedup_isal_inflate(struct inflate_state *s, const uint8_t *in, uint32_t *in_len,
			 uint8_t *out, uint32_t *out_len, int *done)
{
	s->next_in = (uint8_t *)in;
	s->avail_in = *in_len;
	s->next_out = out;
	s->avail_out = *out_len;
	int ret = isal_inflate(s);
	*in_len = s->avail_in;
	*out_len = s->avail_out;
	*done = s->block_state == ISAL_BLOCK_FINISH;
	return ret;
}
