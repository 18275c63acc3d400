//! The tools' `--json` reports, checked against docs/reports.md: the key tables there are the
//! schema, so a report with a key the page does not list, one it lacks, or a value of another
//! type fails the suite that made it.

use serde_json::Value;

/// The documented keys of report `kind`: `(key, type)` as the page's table says.
fn documented(kind: &str) -> Vec<(String, String)> {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/reports.md"))
        .expect("docs/reports.md");
    let heading = format!("### kind `{kind}`");
    let at = page
        .find(&heading)
        .unwrap_or_else(|| panic!("docs/reports.md has no {heading}"));
    page[at..]
        .lines()
        .skip_while(|l| !l.starts_with("| key"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_owned(), cells[2].to_owned())
        })
        .collect()
}

/// Whether `v` is of the documented type `ty`.
fn fits(v: &Value, ty: &str) -> bool {
    let fields = |ty: &str| -> Vec<String> {
        let inner = ty
            .split_once('(')
            .map_or("", |(_, r)| r.trim_end_matches(')'));
        inner.split(',').map(|f| f.trim().to_owned()).collect()
    };
    match ty {
        "string" => v.is_string(),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "string or null" => v.is_string() || v.is_null(),
        "integer or null" => v.is_u64() || v.is_i64() || v.is_null(),
        "array of strings" => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
        t if t.starts_with("array of objects (") => v.as_array().is_some_and(|a| {
            let want = fields(t);
            a.iter().all(|o| {
                o.as_object().is_some_and(|o| {
                    o.len() == want.len() && want.iter().all(|k| o.contains_key(k))
                })
            })
        }),
        other => panic!("docs/reports.md: unknown type {other:?}"),
    }
}

/// Parses a tool's standard output as one JSON report and checks it against the page: the
/// schema, the kind, exactly the documented keys, each of its documented type.
pub fn json_report(stdout: &str, schema: &str, kind: &str) -> Value {
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}):\n{stdout}"));
    assert_eq!(v["schema"], schema, "{v}");
    assert_eq!(v["kind"], kind, "{v}");
    let keys = documented(kind);
    let object = v.as_object().expect("an object");
    for (key, ty) in &keys {
        let value = object
            .get(key)
            .unwrap_or_else(|| panic!("{kind} report lacks {key}: {v}"));
        assert!(
            fits(value, ty),
            "{kind} report: {key} = {value} is not {ty}"
        );
    }
    for key in object.keys() {
        assert!(
            keys.iter().any(|(k, _)| k == key),
            "{kind} report has {key}, which docs/reports.md does not list"
        );
    }
    v
}
