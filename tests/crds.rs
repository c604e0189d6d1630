//! `crds/` is generated from the API types; this keeps the checked-in file from drifting.

#[test]
fn checked_in_crds_match_the_api_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/safedetach.io.yaml");
    let checked_in = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let generated = safe_detach::api::crds_yaml().expect("serialize the CRDs");
    if checked_in == generated {
        return;
    }
    let (line, (old, new)) = checked_in
        .split('\n')
        .map(Some)
        .chain(std::iter::repeat(None))
        .zip(
            generated
                .split('\n')
                .map(Some)
                .chain(std::iter::repeat(None)),
        )
        .enumerate()
        .find(|(_, (old, new))| old != new)
        .expect("different texts differ in some line");
    panic!(
        "crds/safedetach.io.yaml is out of date with src/api; regenerate it with\n\n    \
         cargo run -- crds > crds/safedetach.io.yaml\n\n\
         first difference at line {}:\n  file:      {:?}\n  generated: {:?}",
        line + 1,
        old.unwrap_or("<end of file>"),
        new.unwrap_or("<end of output>"),
    );
}
