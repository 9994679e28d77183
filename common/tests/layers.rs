//! The modules of `common` in layers: each may use only the modules before it, so nothing below
//! imports what is above and there is no circle. Domain values, passwords and tokens refuse in
//! their own terms; `error` (the HTTP edge) maps them; `db` maps `sqlx::Error` beside itself.

const LAYERS: &[&str] = &[
    "secret",
    "response",
    "telemetry",
    "rds_token",
    "config",
    "domain",
    "jwt",
    "password",
    "error",
    "db",
    "http",
    "state",
    "runtime",
];

#[test]
fn modules_use_only_the_layers_below_them() {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    let mut modules: Vec<String> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter_map(|f| f.strip_suffix(".rs").map(str::to_string))
        .filter(|m| m != "lib")
        .collect();
    modules.sort();
    let mut layered: Vec<String> = LAYERS.iter().map(|m| m.to_string()).collect();
    layered.sort();
    assert_eq!(
        modules, layered,
        "every module of common has its place in LAYERS"
    );
    for (rank, module) in LAYERS.iter().enumerate() {
        let text = std::fs::read_to_string(format!("{src}/{module}.rs")).unwrap();
        for other in &LAYERS[rank + 1..] {
            assert!(
                !text.contains(&format!("crate::{other}::")),
                "{module} uses crate::{other}, which is above it"
            );
        }
    }
}
