#!/bin/bash
# tests/systemd/e2e.sh DEB... : installs the s3dedup .debs into a throw-away Debian 12 container
# booted with a real systemd as PID 1 (systemd-nspawn; no host systemd needed) and drives them as
# a user would: apt install (also with the port taken), socket activation with the real Filetracker
# client, restart and upgrade under load, every ListenStream= served, a broken configuration,
# watchdog, timer, migrator, the tools run by hand as root (with S3 secrets), man pages, journal,
# remove, purge (keeping the store unless confirmed). Needs root.
# Touches nothing on the host except: apt-get install of systemd-container + debootstrap (first
# run), the cached base rootfs under $E2E_CACHE, and short-lived cgroup dirs / /run/systemd/nspawn
# that it removes again. Prints "N passed, M failed" last; exit 0 only if nothing failed.
# Environment: E2E_CACHE (base rootfs cache), FT_PIP (a pip that can fetch the Filetracker client),
# E2E_S3_SERVER (the suites' S3 server binary; default target/debug/s3-test-server).
set -uo pipefail

E2E_CACHE=${E2E_CACHE:-/var/tmp/s3dedup-e2e/cache}
# The Debian mirror this machine's apt uses.
E2E_MIRROR=${E2E_MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null)}
PORT=9999
NAME=e2e$$
BASE=$E2E_CACHE/bookworm-systemd
RUN=/var/tmp/s3dedup-e2e/run-$NAME
CG=e2e-$NAME
PASS=0; FAIL=0

log()  { printf '\n### %s\n' "$*"; }
ok()   { PASS=$((PASS+1)); echo "PASS: $*"; }
bad()  { FAIL=$((FAIL+1)); echo "FAIL: $*"; }
check(){ local d=$1; shift; if "$@"; then ok "$d"; else bad "$d"; fi; }
in_box(){ nsenter -t "$CPID" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin TERM=dumb LANG=C.UTF-8 \
            SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"; }
prop() { in_box systemctl show -p "$2" --value "$1"; }
not()  { ! "$@"; }
# The real Filetracker client inside the container (bundle bind-mounted at /ftclient).
ft()   { in_box env PYTHONPATH=/ftclient python3 /ftclient/client_check.py "$@"; }
# ... as a user: ft_as USER:PASSWORD COMMAND...
ft_as(){ in_box env PYTHONPATH=/ftclient FT_URL="http://$1@127.0.0.1:$PORT" python3 /ftclient/client_check.py "${@:2}"; }
# Polls a check for up to 10 s (what a reload changes, it changes a moment later).
soon() { for _ in $(seq 50); do "$@" 2>/dev/null && return 0; sleep 0.2; done; "$@"; }
# (capture first: with pipefail, 'systemctl ... | grep -q' fails randomly when grep exits early)
has()  { local text; text=$("${@:2}"); grep -q -- "$1" <<<"$text"; }
port_answers() { in_box curl -s -m 3 "http://127.0.0.1:$PORT/status" >/dev/null; }
# apt and dpkg as an unattended admin would run them (debconf asks nothing, takes defaults).
apt_box() { in_box env DEBIAN_FRONTEND=noninteractive "$@"; }
exit_of() { in_box sh -c "$1 >/tmp/exit_of.out 2>&1; echo \$?"; }
cleaner_runs() { local j; j=$(in_box journalctl -u s3dedup-cleaner.service -o cat); grep -c '^Finished' <<<"$j"; }

[ $# -ge 1 ] || { echo "usage: $0 pkg.deb..."; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root"; exit 2; }
S3_SERVER=${E2E_S3_SERVER:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug/s3-test-server}
[ -x "$S3_SERVER" ] || (cd "$(dirname "$0")/../.." && cargo build -q -p s3-test-server) || exit 2
T0=$(date +%s)

# ---------------------------------------------------------------- tools
if ! command -v systemd-nspawn >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing systemd-container debootstrap"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd-container debootstrap >/dev/null
fi

# ---------------------------------------------------------------- base rootfs (cached)
# The container has no network: what the packages depend on from the archive (libisal2) is in
# the base already, as a mirror would provide it.
if [ ! -x "$BASE/lib/systemd/systemd" ] || [ ! -x "$BASE/usr/bin/python3" ] || [ ! -x "$BASE/usr/bin/man" ] ||
   ! ls "$BASE"/var/lib/dpkg/info/libisal2*.list > /dev/null 2>&1; then
  log "debootstrap bookworm from $E2E_MIRROR (first run only)"
  rm -rf "$BASE" "$BASE.partial"; mkdir -p "$E2E_CACHE"
  debootstrap --variant=minbase \
     --include=systemd,systemd-sysv,dbus,adduser,curl,ca-certificates,procps,iproute2,python3,libisal2,man-db \
     bookworm "$BASE.partial" "$E2E_MIRROR" > "$E2E_CACHE/debootstrap.log" 2>&1 \
     || { tail -20 "$E2E_CACHE/debootstrap.log"; echo "0 passed, 1 failed"; exit 1; }
  # quiet, deterministic boots: no apt/e2scrub/fstrim timers, no getty on the (passive) console
  for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer \
           e2scrub_reap.service console-getty.service getty@tty1.service; do
    ln -sf /dev/null "$BASE.partial/etc/systemd/system/$u"
  done
  rm -f "$BASE.partial/usr/sbin/policy-rc.d"
  echo s3dedup-e2e > "$BASE.partial/etc/hostname"
  mv "$BASE.partial" "$BASE"
fi

# ---------------------------------------------------------------- what the container gets
mkdir -p "$RUN/debs" "$RUN/debs-new" "$RUN/ftclient" "$RUN/v1/files/imported/sub" "$RUN/v1hand/files/byhand" "$RUN/tools"
cp -- "$@" "$RUN/debs/"
cp "$S3_SERVER" "$RUN/tools/s3-test-server"
# The same packages as a newer version, for an upgrade (only the version differs; the maintainer
# scripts an upgrade runs are the real ones).
OLDVER=$(dpkg-deb -f "$1" Version); NEWVER="$OLDVER+e2e1"
for d in "$@"; do
  rm -rf "$RUN/repack"; dpkg-deb -R "$d" "$RUN/repack"
  sed -i -e "s/^Version: .*/Version: $NEWVER/" -e "s/(= $OLDVER)/(= $NEWVER)/g" "$RUN/repack/DEBIAN/control"
  dpkg-deb -b "$RUN/repack" "$RUN/debs-new/" > /dev/null
done
rm -rf "$RUN/repack"
PIP=${FT_PIP:-pip3}
# The client and its pure-Python dependencies, for the container's own python3 (no network there).
"$PIP" install -q --target "$RUN/ftclient" --no-deps filetracker==2.3.3 requests urllib3 idna certifi \
    charset-normalizer six > "$RUN/pip.log" 2>&1 || { cat "$RUN/pip.log"; echo "0 passed, 1 failed"; exit 1; }
cp "$(dirname "$0")/client_check.py" "$RUN/ftclient/"
# A Filetracker v1 directory for the migrator unit.
printf 'from the old filetracker\n' > "$RUN/v1/files/imported/sub/old.txt"
touch -d @1500000000 "$RUN/v1/files/imported/sub/old.txt"
printf 'second\n' > "$RUN/v1/files/imported/two.txt"
touch -d @1600000000 "$RUN/v1/files/imported/two.txt"
printf 'imported by hand\n' > "$RUN/v1hand/files/byhand/three.txt"

cleanup() {
  if [ -n "${NSPID:-}" ] && kill -0 "$NSPID" 2>/dev/null; then
    kill -TERM "$NSPID"                              # nspawn turns this into a clean halt
    for _ in $(seq 50); do kill -0 "$NSPID" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$NSPID" 2>/dev/null && kill -KILL "$NSPID"
    wait "$NSPID" 2>/dev/null
  fi
  for h in systemd unified; do
    [ -d /sys/fs/cgroup/$h/$CG ] && find /sys/fs/cgroup/$h/$CG -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  find /run/systemd/nspawn -depth -type d -empty -exec rmdir {} \; 2>/dev/null
  rm -rf "$RUN"
}
trap cleanup EXIT

# ---------------------------------------------------------------- boot
log "booting container $NAME"
for h in systemd unified; do mkdir -p /sys/fs/cgroup/$h/$CG; done
boot() {
  (
    # own cgroup, so nspawn's payload/supervisor cgroups are created below it and removed with it
    for h in systemd unified; do echo "$BASHPID" > /sys/fs/cgroup/$h/$CG/cgroup.procs 2>/dev/null; done
    export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1
    exec systemd-nspawn --quiet -D "$BASE" -M "$NAME" \
         --register=no --keep-unit --volatile=overlay --private-network \
         --bind-ro="$RUN/debs:/debs" --bind-ro="$RUN/debs-new:/debs-new" --bind-ro="$RUN/ftclient:/ftclient" \
         --bind-ro="$RUN/v1:/srv/ftv1" --bind-ro="$RUN/v1hand:/srv/ftv1hand" --bind-ro="$RUN/tools:/tools" \
         --console=passive --boot
  ) > "$RUN/console.log" 2>&1 < /dev/null &
  NSPID=$!
  CPID=
  for _ in $(seq 100); do CPID=$(pgrep -P "$NSPID" | head -1); [ -n "$CPID" ] && break; sleep 0.1; done
  [ -n "$CPID" ] || { cat "$RUN/console.log"; echo "0 passed, 1 failed"; exit 1; }
  STATE=
  for _ in $(seq 120); do
    STATE=$(timeout 60 nsenter -t "$CPID" -a systemctl is-system-running --wait 2>/dev/null)
    case "$STATE" in running|degraded) break;; esac
    kill -0 "$NSPID" 2>/dev/null || break
    sleep 0.25
  done
}
boot
# A container that died before the packages were even installed says nothing about them (CI saw
# nspawn exit at boot once, on a busy machine): show why, and boot once more.
if [ "$STATE" != running ] && ! kill -0 "$NSPID" 2>/dev/null; then
  echo "the container exited while booting (state=$STATE); its console:"
  tail -30 "$RUN/console.log"
  wait "$NSPID" 2>/dev/null
  boot
fi
check "container booted to running (state=$STATE)" test "$STATE" = running

# ---------------------------------------------------------------- install like a user
log "apt-get install /debs/*.deb while another program holds 127.0.0.1:$PORT"
DEBS=$(cd "$RUN/debs" && printf '/debs/%s ' *.deb)
NEWDEBS=$(cd "$RUN/debs-new" && printf '/debs-new/%s ' *.deb)
in_box systemd-run --quiet --unit e2e-squatter python3 -m http.server "$PORT" --bind 127.0.0.1
for _ in $(seq 50); do port_answers && break; sleep 0.1; done
check "apt-get install fails while the port is taken" not apt_box sh -c "apt-get install -y $DEBS > /tmp/apt0.log 2>&1"
check "... saying which address could not be listened on" has "could not listen on: 127.0.0.1:$PORT" in_box cat /tmp/apt0.log
in_box systemctl stop e2e-squatter
check "dpkg --configure -a completes the install once the port is free" \
      apt_box sh -c 'dpkg --configure -a > /tmp/apt.log 2>&1 || { cat /tmp/apt.log; false; }'
check "all four packages installed" test "$(in_box dpkg-query -W -f='${db:Status-Abbrev}\n' s3dedup s3dedup-api s3dedup-cleaner s3dedup-migrator | sort -u)" = "ii "
check "socket listening after it" test "$(prop s3dedup-api.socket ActiveState)" = active
check "s3dedup-api depends on ISA-L (its gzip inflater)" has libisal2 in_box dpkg-query -W -f='${Depends}' s3dedup-api
check "system user s3dedup exists"  in_box getent passwd s3dedup
check "config installed as a conffile" has /etc/s3dedup/s3dedup.toml in_box dpkg-query -W -f='${Conffiles}' s3dedup
check "socket enabled"              test "$(in_box systemctl is-enabled s3dedup-api.socket)" = enabled
check "timer enabled"               test "$(in_box systemctl is-enabled s3dedup-cleaner.timer)" = enabled
check "units pass systemd-analyze verify" in_box systemd-analyze verify --man=no \
      s3dedup-api.socket s3dedup-api.service s3dedup-cleaner.timer s3dedup-cleaner.service s3dedup-migrator.service
manpage() { local text; text=$(in_box env MANPAGER=cat COLUMNS=100 man "$1" 2>&1); grep -q -- "$2" <<<"$text"; }
check "man s3dedup-api documents --check-config" manpage s3dedup-api --check-config
check "man s3dedup-cleaner documents --verify" manpage s3dedup-cleaner --verify
check "man s3dedup-migrator documents --source" manpage s3dedup-migrator --source
check "man s3dedup.toml documents every section (grace_period_secs)" manpage s3dedup.toml grace_period_secs
check "bash completion installed" in_box test -s /usr/share/bash-completion/completions/s3dedup-cleaner
docs_resolve() {
  local u d
  for u in s3dedup-api.socket s3dedup-api.service s3dedup-cleaner.timer s3dedup-cleaner.service s3dedup-migrator.service; do
    for d in $(prop "$u" Documentation); do
      case "$d" in
        file:*) in_box test -f "${d#file:}" || { echo "$u: $d missing"; return 1; } ;;
        man:*)  in_box man -w "$(sed 's/man:\(.*\)(\(.*\))/\2 \1/' <<<"$d")" > /dev/null 2>&1 || { echo "$u: $d missing"; return 1; } ;;
      esac
    done
  done
}
check "every unit's Documentation= exists" docs_resolve
check "README.Debian and the examples installed" in_box test -f /usr/share/doc/s3dedup/README.Debian -a -f /usr/share/doc/s3dedup/examples/s3-postgres.toml

# ---------------------------------------------------------------- socket activation + the real client
log "socket activation"
check "systemctl start s3dedup-api.socket" in_box systemctl start s3dedup-api.socket
check "service inactive before the first connection" test "$(prop s3dedup-api.service ActiveState)" = inactive
check "real Filetracker client: put, get, list, delete through the socket" ft basic
check "service active/running after it (READY=1 seen)" \
      test "$(prop s3dedup-api.service ActiveState)/$(prop s3dedup-api.service SubState)" = active/running
check "service runs as s3dedup" test "$(in_box ps -o user= -p "$(prop s3dedup-api.service MainPID)")" = s3dedup
check "STATUS= line reported" test -n "$(prop s3dedup-api.service StatusText)"
# The units' hardening as systemd rates it: every exposure in its OK band (below 5.0) or better.
exposure() { in_box systemd-analyze security --no-pager "$1" | grep -o 'exposure level for [^:]*: [0-9.]* [A-Z]*' | awk '{print $(NF-1), $NF}'; }
for u in s3dedup-api.service s3dedup-cleaner.service s3dedup-migrator.service; do
  E=$(exposure "$u")
  check "$u hardened (exposure ${E:-unknown})" grep -Eq ' (OK|SAFE|PERFECT)$' <<<"$E"
done

log "restart while a client sends a stream of requests"
in_box sh -c 'PYTHONPATH=/ftclient python3 /ftclient/client_check.py stream 25 > /tmp/stream.log 2>&1; echo $? > /tmp/stream.rc' &
STREAM=$!
sleep 2
in_box systemctl restart s3dedup-api.service; sleep 2
in_box systemctl restart s3dedup-api.service
wait $STREAM
check "no request failed across two restarts ($(in_box tail -1 /tmp/stream.log))" test "$(in_box cat /tmp/stream.rc)" = 0
in_box grep -m 5 '^failed:' /tmp/stream.log   # what a failed request saw, if any

log "upgrade to $NEWVER while a client sends requests and another keeps connecting"
OLD=$(prop s3dedup-api.service MainPID)
in_box sh -c 'PYTHONPATH=/ftclient python3 /ftclient/client_check.py stream 20 > /tmp/up-stream.log 2>&1; echo $? > /tmp/up-stream.rc' &
UPSTREAM=$!
in_box sh -c 'PYTHONPATH=/ftclient python3 /ftclient/client_check.py probe 20 > /tmp/up-probe.log 2>&1; echo $? > /tmp/up-probe.rc' &
UPPROBE=$!
sleep 3
check "apt-get install of version $NEWVER" apt_box sh -c "apt-get install -y $NEWDEBS > /tmp/apt2.log 2>&1 || { cat /tmp/apt2.log; false; }"
wait $UPSTREAM $UPPROBE
check "$NEWVER installed" test "$(in_box dpkg-query -W -f='${Version}' s3dedup-api)" = "$NEWVER"
check "no request failed during the upgrade ($(in_box tail -1 /tmp/up-stream.log))" test "$(in_box cat /tmp/up-stream.rc)" = 0
check "no connection refused during the upgrade ($(in_box tail -1 /tmp/up-probe.log))" test "$(in_box cat /tmp/up-probe.rc)" = 0
in_box grep -m 5 '^failed:' /tmp/up-stream.log /tmp/up-probe.log
check "the API restarted into the new binary (new MainPID)" test "$(prop s3dedup-api.service MainPID)" != "$OLD"
check "still serving after the upgrade" ft basic

log "every ListenStream= is served"
in_box sh -c 'mkdir -p /run/systemd/system/s3dedup-api.socket.d && printf "[Socket]\nListenStream=/run/s3dedup-api.sock\n" > /run/systemd/system/s3dedup-api.socket.d/e2e.conf && systemctl daemon-reload && systemctl stop s3dedup-api.service && systemctl restart s3dedup-api.socket'
check "TCP answered beside a second socket" in_box curl -sf -m 10 -o /dev/null "http://127.0.0.1:$PORT/version"
check "the second socket (Unix) answered too" in_box curl -sf -m 10 -o /dev/null --unix-socket /run/s3dedup-api.sock http://localhost/version
in_box sh -c 'rm -r /run/systemd/system/s3dedup-api.socket.d && systemctl daemon-reload && systemctl stop s3dedup-api.service && systemctl restart s3dedup-api.socket'

log "a broken configuration is explained and not restarted in a loop"
in_box cp /etc/s3dedup/s3dedup.toml /root/s3dedup.toml.good
# A usual slip: an [api] key written above every section.
in_box sed -i '/^data_dir/a listen = "0.0.0.0:9999"' /etc/s3dedup/s3dedup.toml
check "s3dedup-api --check-config exits 2" test "$(exit_of 's3dedup-api --check-config')" = 2
check "... naming the key ($(in_box head -c 300 /tmp/exit_of.out))" has '`listen`' in_box cat /tmp/exit_of.out
in_box systemctl restart s3dedup-api.service 2>/dev/null
# a client waiting in the socket meanwhile
in_box curl -s -m 15 -o /dev/null "http://127.0.0.1:$PORT/version" &
CURL=$!
sleep 12
check "the API exited 2 and stays down ($(prop s3dedup-api.service Result)/$(prop s3dedup-api.service ExecMainStatus))" \
      test "$(prop s3dedup-api.service ExecMainStatus)/$(prop s3dedup-api.service ActiveState)" = 2/failed
check "not restarted by its unit (NRestarts=$(prop s3dedup-api.service NRestarts))" test "$(prop s3dedup-api.service NRestarts)" = 0
STARTS=$(in_box journalctl -u s3dedup-api.service -o cat --since "-15s" | grep -c 'configuration key `listen`')
check "started at most a few times in 12 s, not every 2 s ($STARTS)" test "$STARTS" -le 5
check "the error is in the journal at err priority" has 'configuration key `listen`' in_box journalctl -u s3dedup-api.service -p err -o cat
wait $CURL
in_box cp /root/s3dedup.toml.good /etc/s3dedup/s3dedup.toml
in_box sh -c 'systemctl reset-failed s3dedup-api.service s3dedup-api.socket; systemctl restart s3dedup-api.socket'
check "serving again once the configuration is fixed" ft basic

log "watchdog: a frozen daemon is restarted"
in_box sh -c 'mkdir -p /run/systemd/system/s3dedup-api.service.d && printf "[Service]\nWatchdogSec=2s\nRestartSec=100ms\n" > /run/systemd/system/s3dedup-api.service.d/e2e.conf && systemctl daemon-reload && systemctl restart s3dedup-api.service'
sleep 3
check "no watchdog restart while healthy" test "$(prop s3dedup-api.service NRestarts)" = 0
# (No MainPID means the service is not running; `kill -STOP 0` would stop this script instead.)
OLD=$(prop s3dedup-api.service MainPID); [ "${OLD:-0}" -gt 0 ] && in_box kill -STOP "$OLD"; sleep 5
check "watchdog fired and restarted it (NRestarts=$(prop s3dedup-api.service NRestarts))" test "$(prop s3dedup-api.service NRestarts)" -ge 1
check "new MainPID after the watchdog" test "$(prop s3dedup-api.service MainPID)" != "$OLD"
in_box sh -c 'rm -r /run/systemd/system/s3dedup-api.service.d; systemctl daemon-reload; systemctl restart s3dedup-api.service; systemctl reset-failed'
check "serving again" ft basic

# ---------------------------------------------------------------- cleaner: service + timer
log "cleaner"
check "systemctl start s3dedup-cleaner.service" in_box systemctl start s3dedup-cleaner.service
check "cleaner Result=success" test "$(prop s3dedup-cleaner.service Result)" = success
in_box sh -c 'mkdir -p /run/systemd/system/s3dedup-cleaner.timer.d && printf "[Timer]\nOnActiveSec=1s\nRandomizedDelaySec=0\nAccuracySec=100ms\n" > /run/systemd/system/s3dedup-cleaner.timer.d/e2e.conf && systemctl daemon-reload && systemctl restart s3dedup-cleaner.timer'
N0=$(cleaner_runs); sleep 4; N1=$(cleaner_runs)
check "the timer fired the cleaner ($N0 -> $N1 runs)" test "$N1" -gt "$N0"
check "cleaner summary in the journal" has "freed" in_box journalctl -u s3dedup-cleaner.service -o cat
# Said once a run (standard output is the journal too), and naming what waits for the grace period.
REPEATED=$(in_box journalctl -u s3dedup-cleaner.service -o cat | grep freed | uniq -d)
check "cleaner summary said once a run ${REPEATED:+(twice: $REPEATED)}" test -z "$REPEATED"
check "cleaner summary says what waits for the grace period" has "wait for the grace period" in_box journalctl -u s3dedup-cleaner.service -o cat
S3DEDUP_UID=$(in_box id -u s3dedup)
check "cleaner ran as s3dedup (uid $S3DEDUP_UID)" has "\"_UID\":\"$S3DEDUP_UID\"" in_box journalctl -u s3dedup-cleaner.service -o json

# ---------------------------------------------------------------- migrator
log "migrator imports a v1 directory"
# As an operator would: set the source in the shipped configuration.
in_box sed -i 's|^# source = "v2:/var/lib/filetracker".*|source = "v1:/srv/ftv1"|' /etc/s3dedup/s3dedup.toml
check "migrator.source set in the config" has 'source = "v1:/srv/ftv1"' in_box cat /etc/s3dedup/s3dedup.toml
check "systemctl start s3dedup-migrator.service" in_box systemctl start s3dedup-migrator.service
check "migrator active (exited), status 0" \
      test "$(prop s3dedup-migrator.service ActiveState)/$(prop s3dedup-migrator.service SubState)/$(prop s3dedup-migrator.service ExecMainStatus)" = active/exited/0
check "migrated files readable with their versions through the client" ft migrated
check "migrator ran as s3dedup" has "\"_UID\":\"$S3DEDUP_UID\"" in_box journalctl -u s3dedup-migrator.service -o json
MIGRATED=$(in_box journalctl -u s3dedup-migrator.service -o cat | grep 'files migrated')
check "migrator summary in the journal, said once a run" \
      test -n "$MIGRATED" -a -z "$(uniq -d <<<"$MIGRATED")"

# ---------------------------------------------------------------- the tools by hand
log "the cleaner and the migrator run by hand as root"
in_box sh -c 'cd /root && s3dedup-cleaner --stats > /tmp/stats.out 2> /tmp/stats.err'
check "cleaner --stats by hand says it read /etc/s3dedup/s3dedup.toml" has "/etc/s3dedup/s3dedup.toml" in_box cat /tmp/stats.err
check "... and reports the store's files ($(in_box head -1 /tmp/stats.out))" has "^files: *[1-9]" in_box cat /tmp/stats.out
check "... and created no store where it ran" not in_box test -e /root/s3dedup-data
check "cleaner --stats on a store that is not there: exit 2" test "$(exit_of 's3dedup-cleaner --stats --data-dir /srv/nothing')" = 2
check "... saying so, and creating nothing" test "$(in_box grep -c 'no s3dedup store' /tmp/exit_of.out)/$(in_box test -e /srv/nothing; echo $?)" = 1/1
check "migrator by hand as root" in_box s3dedup-migrator --source v1:/srv/ftv1hand
check "nothing in /var/lib/s3dedup is owned by another user than s3dedup" \
      test -z "$(in_box find /var/lib/s3dedup ! -user s3dedup)"
check "the daemon serves what the migrator imported by hand" ft has /byhand/three.txt

# ---------------------------------------------------------------- S3, secrets by LoadCredential=
log "S3 with its secret from /etc/s3dedup/secrets: the daemon and the tools by hand"
in_box systemd-run --quiet --unit e2e-s3 /tools/s3-test-server --listen 127.0.0.1:9000 \
       --access-key e2e-key --secret-key e2e-secret --bucket filetracker /var/tmp/s3
in_box sh -c 'umask 077 && printf "e2e-secret\n" > /etc/s3dedup/secrets/s3-secret'
in_box cp /etc/s3dedup/s3dedup.toml /root/s3dedup.toml.local
in_box sh -c 'cat > /etc/s3dedup/s3dedup.toml <<EOF
data_dir = "/var/lib/s3dedup/s3"
[store]
backend = "s3"
[store.s3]
bucket = "filetracker"
endpoint = "http://127.0.0.1:9000"
access_key_id = "e2e-key"
secret_access_key_file = "secrets_s3-secret"
EOF'
check "s3dedup-api --check-config accepts it (and reads the secret)" in_box s3dedup-api --check-config
in_box systemctl restart s3dedup-api.service
check "the API serves from S3 (the secret passed with LoadCredential=)" ft basic
check "migrator by hand as root on S3 (same secret, no \$CREDENTIALS_DIRECTORY)" in_box s3dedup-migrator --source v1:/srv/ftv1hand
check "the daemon serves it" ft has /byhand/three.txt
check "cleaner --stats by hand as root on S3" has "^files: *1$" in_box s3dedup-cleaner --stats
log "an S3 outage as the operator sees it: systemctl status and the journal"
in_box systemctl stop e2e-s3
OUTAGE_PUT="http://127.0.0.1:$PORT/files/outage/new.txt?last_modified=Tue,+14+Nov+2023+22:13:20+GMT"
# Random bytes do not compress: well above store.inline_max_bytes, so an object.
in_box sh -c 'head -c 20000 /dev/urandom > /tmp/outage.bin'
CODE=$(in_box curl -s -m 30 -o /dev/null -w '%{http_code}' -X PUT --data-binary @/tmp/outage.bin "$OUTAGE_PUT")
check "a new large file's PUT while S3 is down is a 5xx ($CODE)" test "${CODE:0:1}" = 5
SMALL_PUT="http://127.0.0.1:$PORT/files/outage/small.txt?last_modified=Tue,+14+Nov+2023+22:13:20+GMT"
check "a small file's PUT while S3 is down is stored (kept in the database)" \
      test "$(in_box curl -s -m 30 -o /dev/null -w '%{http_code}' -X PUT --data-binary "small during the outage $$" "$SMALL_PUT")" = 200
check "... and read back while S3 is still down" \
      test "$(in_box curl -s --compressed -m 30 "http://127.0.0.1:$PORT/files/outage/small.txt")" = "small during the outage $$"
check "the journal names the request, its answer and the cause" \
      has "request failed: PUT \"/files/outage/new.txt\" answered $CODE: .*[Rr]efused" \
      in_box journalctl -u s3dedup-api.service -o cat
wait_status() { for _ in $(seq 30); do has "$1" prop s3dedup-api.service StatusText && return 0; sleep 1; done; return 1; }
check "systemctl status says degraded, and why" wait_status "^degraded: .*object store"
check "the journal says once that files whose contents are objects are not served, and why" \
      test "$(in_box journalctl -u s3dedup-api.service -o cat | grep -c '^not serving files whose contents are objects: .*object store')" = 1
in_box systemd-run --quiet --unit e2e-s3b /tools/s3-test-server --listen 127.0.0.1:9000 \
       --access-key e2e-key --secret-key e2e-secret --bucket filetracker /var/tmp/s3
check "status back to serving once S3 answers" wait_status "^serving"
check "the journal says it serves again" \
      has "^serving again: the database and the object store answer" in_box journalctl -u s3dedup-api.service -o cat
check "the same PUT succeeds after the outage" \
      test "$(in_box curl -s -m 30 -o /dev/null -w '%{http_code}' -X PUT --data-binary @/tmp/outage.bin "$OUTAGE_PUT")" = 200
in_box sh -c 'umask 077 && printf "wrong\n" > /etc/s3dedup/secrets/s3-secret'
check "a wrong secret is the S3 server's refusal (--verify reads from S3)" test "$(exit_of 's3dedup-cleaner --verify')" != 0
check "... a 403 it names" has 403 in_box cat /tmp/exit_of.out
in_box cp /root/s3dedup.toml.local /etc/s3dedup/s3dedup.toml
in_box sh -c 'systemctl restart s3dedup-api.service; systemctl stop e2e-s3b'
check "serving the local store again" ft has /byhand/three.txt

# ---------------------------------------------------------------- journal + health
log "journal"
JSON=$(in_box journalctl -u s3dedup-api.service -o json --no-pager)
check "structured fields in the journal (S3DEDUP_ADDR)" grep -q '"S3DEDUP_ADDR":"127.0.0.1:9999"' <<<"$JSON"
check "structured fields in the journal (TARGET)" grep -q '"TARGET":"s3dedup_api::server"' <<<"$JSON"
# What `journalctl -u` and `systemctl status` show is the message alone: it names the address.
check "the listening line names the address" has "listening on 127.0.0.1:9999" in_box journalctl -u s3dedup-api.service -o cat
check "no terminal colour codes in the journal" \
      not grep -q $'\x1b' <<<"$(in_box journalctl -u 's3dedup*' -o cat --no-pager)"
check "/metrics shows the cleaner's last run" has 's3dedup_last_run_timestamp_seconds{tool="s3dedup-cleaner",kind="collect"}' in_box curl -s "http://127.0.0.1:$PORT/metrics"
log "users: [auth] turned on and off by systemctl reload, the daemon kept"
HASH=$(in_box sh -c 'printf "judge-pw\n" | s3dedup-api --hash-password')
check "s3dedup-api --hash-password prints an argon2id hash" has '^\$argon2id\$' echo "$HASH"
printf '[[auth.users]]\nname = "judge"\nrole = "admin"\npassword_hash = "%s"\n' "$HASH" > "$RUN/tools/auth.toml"
in_box cp /etc/s3dedup/s3dedup.toml /root/s3dedup.toml.noauth
# As an admin follows the packaged file: mode under its [auth], a user table at the end.
in_box sed -i 's/^\[auth\]$/[auth]\nmode = "basic"/' /etc/s3dedup/s3dedup.toml
in_box sh -c 'cat /tools/auth.toml >> /etc/s3dedup/s3dedup.toml'
check "s3dedup-api --check-config accepts the users" has "auth: basic, 1 users" in_box s3dedup-api --check-config
API_PID=$(prop s3dedup-api.service MainPID)
check "systemctl reload s3dedup-api.service" in_box systemctl reload s3dedup-api.service
check "after the reload a client without credentials is refused" soon not ft has /byhand/three.txt
check "... and the real client with judge:judge-pw in its URL is served" ft_as judge:judge-pw basic
check "... a wrong password is refused" not ft_as judge:wrong has /byhand/three.txt
check "the reload kept the daemon (PID $API_PID)" test "$(prop s3dedup-api.service MainPID)" = "$API_PID"
check "the journal says what the reload put in force" \
      has "reloaded on SIGHUP: auth basic, 1 users" in_box journalctl -u s3dedup-api.service -o cat
check "the journal names the failed login's user and address" \
      has 'login failed: user "judge" from 127.0.0.1' in_box journalctl -u s3dedup-api.service -o cat
in_box cp /root/s3dedup.toml.noauth /etc/s3dedup/s3dedup.toml
in_box systemctl reload s3dedup-api.service
check "auth off again after the next reload" soon ft has /byhand/three.txt
FAILED=$(in_box systemctl --failed --plain --no-legend)
check "no failed units ${FAILED:+($FAILED)}" test -z "$FAILED"

# ---------------------------------------------------------------- remove / purge
log "remove"
check "apt-get remove" in_box sh -c 'apt-get remove -y s3dedup s3dedup-api s3dedup-cleaner s3dedup-migrator > /tmp/rm.log 2>&1 || { cat /tmp/rm.log; false; }'
check "socket stopped, port closed" not port_answers
check "service stopped" test "$(prop s3dedup-api.service ActiveState)" != active
check "configuration kept after remove" in_box test -f /etc/s3dedup/s3dedup.toml
check "state kept after remove" in_box test -d /var/lib/s3dedup
log "purge keeps the store unless the admin confirms"
check "apt-get purge" apt_box sh -c 'apt-get purge -y s3dedup s3dedup-api s3dedup-cleaner s3dedup-migrator > /tmp/purge.log 2>&1 || { cat /tmp/purge.log; false; }'
check "configuration gone" not in_box test -e /etc/s3dedup/s3dedup.toml
check "read cache gone" not in_box test -e /var/cache/s3dedup
check "store kept" in_box test -f /var/lib/s3dedup/metadata.sqlite3
check "secrets kept with it" in_box test -f /etc/s3dedup/secrets/s3-secret
check "purge said where the store stays" has "purge kept the store: /var/lib/s3dedup /etc/s3dedup/secrets" in_box cat /tmp/purge.log
check "units gone" test -z "$(in_box systemctl list-unit-files --plain --no-legend 's3dedup*')"
check "no enable links left" test -z "$(in_box find /etc/systemd/system -name 's3dedup*')"
check "reinstall on the kept store" apt_box sh -c "apt-get install -y $NEWDEBS > /tmp/apt3.log 2>&1 || { cat /tmp/apt3.log; false; }"
check "the kept files are served again" ft has /byhand/three.txt
in_box sh -c 'echo "s3dedup s3dedup/purge_store boolean true" | debconf-set-selections'
check "apt-get purge, deleting the store as preseeded" apt_box sh -c 'apt-get purge -y s3dedup s3dedup-api s3dedup-cleaner s3dedup-migrator > /tmp/purge2.log 2>&1 || { cat /tmp/purge2.log; false; }'
check "store gone" not in_box test -e /var/lib/s3dedup
check "configuration and secrets gone" not in_box test -e /etc/s3dedup

if [ "$FAIL" != 0 ]; then
  log "diagnostics"; in_box systemctl --no-pager status 's3dedup*'; in_box journalctl -b --no-pager -n 80
fi
echo; echo "total $(( $(date +%s)-T0 ))s"
echo "$PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
