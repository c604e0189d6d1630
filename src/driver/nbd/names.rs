//! The names the driver gives things in the daemon, and the strict checks on what it is handed.
//!
//! Everything the daemon holds for a volume is named from the volume handle and the node alone, so
//! the daemon's own lists (`query-block-exports`) are enough to say where a volume is connected:
//! no state of ours has to survive a restart for the probe to be right.

use crate::driver::DriverError;

/// Longest accepted volume handle. Handles become file names and QMP ids; this keeps both sane.
pub const MAX_HANDLE_LEN: usize = 128;
/// A DNS subdomain, as Kubernetes node names are.
pub const MAX_NODE_LEN: usize = 253;
/// QEMU keeps node names in a 32-byte buffer with its terminating NUL.
const MAX_BLOCK_NODE_NAME_LEN: usize = 31;
const EXPORT_PREFIX: &str = "sd_";
const SEPARATOR: &str = "__";

/// Checks a volume handle: `[A-Za-z0-9][A-Za-z0-9.-]*`, at most [`MAX_HANDLE_LEN`] characters.
/// No `/` (it names a file directly in the image folder) and no `_` (the export id uses `__` as
/// its separator).
pub fn validate_handle(handle: &str) -> Result<(), DriverError> {
    let invalid = |why: &str| {
        Err(DriverError::Invalid(format!(
            "volume handle {handle:?} {why}"
        )))
    };
    let Some(first) = handle.chars().next() else {
        return invalid("is empty");
    };
    if handle.len() > MAX_HANDLE_LEN {
        return invalid(&format!("is longer than {MAX_HANDLE_LEN} characters"));
    }
    if !first.is_ascii_alphanumeric() {
        return invalid("must start with a letter or digit");
    }
    if !handle
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    {
        return invalid("may contain only letters, digits, '.' and '-'");
    }
    Ok(())
}

/// Checks a node name: a DNS subdomain (lowercase letters, digits, '-' and '.', starting and
/// ending with a letter or digit, at most 253 characters), as Kubernetes node names are.
pub fn validate_node(node: &str) -> Result<(), DriverError> {
    let invalid = |why: &str| Err(DriverError::Invalid(format!("node name {node:?} {why}")));
    let (Some(first), Some(last)) = (node.chars().next(), node.chars().last()) else {
        return invalid("is empty");
    };
    if node.len() > MAX_NODE_LEN {
        return invalid(&format!("is longer than {MAX_NODE_LEN} characters"));
    }
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !alnum(first) || !alnum(last) {
        return invalid("must start and end with a lowercase letter or digit");
    }
    if !node.chars().all(|c| alnum(c) || c == '-' || c == '.') {
        return invalid("may contain only lowercase letters, digits, '-' and '.'");
    }
    Ok(())
}

/// The id of the export of `handle` for `node`, also used as its NBD export name:
/// `sd_<handle>__<node>`. QMP ids must start with a letter; neither part can contain `_`, so the
/// split in [`parse_export_id`] is unambiguous. Callers validate both parts first.
pub fn export_id(handle: &str, node: &str) -> String {
    format!("{EXPORT_PREFIX}{handle}{SEPARATOR}{node}")
}

/// The (handle, node) an export id names, or `None` for an export this driver did not make.
pub fn parse_export_id(id: &str) -> Option<(&str, &str)> {
    let (handle, node) = id.strip_prefix(EXPORT_PREFIX)?.split_once(SEPARATOR)?;
    (validate_handle(handle).is_ok() && validate_node(node).is_ok()).then_some((handle, node))
}

/// The name of the daemon's block node for a volume, shared by all its exports. Short handles
/// are readable (`sd-<handle>`); longer ones do not fit QEMU's 31-character limit and get a hash
/// (`sd_<16 hex digits>`, `_` never occurring in a handle so the two forms cannot meet). A hash
/// can collide, so whoever finds the node already present checks which file it serves.
pub fn block_node_name(handle: &str) -> String {
    let readable = format!("sd-{handle}");
    if readable.len() <= MAX_BLOCK_NODE_NAME_LEN {
        readable
    } else {
        format!("sd_{:016x}", fnv1a64(handle.as_bytes()))
    }
}

/// FNV-1a: stable across builds and platforms, unlike the standard library's hashers.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Percent-encodes a path for the query part of an NBD URI, leaving what needs no escaping.
pub fn uri_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles() {
        for ok in [
            "vol1",
            "V",
            "0",
            "demo-1",
            "a.b-c.img",
            &"x".repeat(MAX_HANDLE_LEN),
        ] {
            assert_eq!(validate_handle(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "..",
            "a/b",
            "a_b",
            "a__b",
            "a b",
            "ä",
            &"x".repeat(MAX_HANDLE_LEN + 1),
        ] {
            assert!(
                matches!(validate_handle(bad), Err(DriverError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn nodes() {
        for ok in [
            "node-a",
            "a",
            "0",
            "worker-1.example.com",
            &"n".repeat(MAX_NODE_LEN),
        ] {
            assert_eq!(validate_node(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "Node",
            "a_b",
            "a__b",
            "-a",
            "a-",
            "a.",
            ".a",
            "a b",
            "a/b",
            &"n".repeat(MAX_NODE_LEN + 1),
        ] {
            assert!(
                matches!(validate_node(bad), Err(DriverError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn export_ids_round_trip() {
        for (handle, node) in [("vol1", "node-a"), ("a.b-c", "w.example.com"), ("0", "1")] {
            let id = export_id(handle, node);
            assert!(id.starts_with(|c: char| c.is_ascii_alphabetic()), "{id}");
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)),
                "{id}"
            );
            assert_eq!(parse_export_id(&id), Some((handle, node)));
        }
    }

    #[test]
    fn foreign_export_ids_are_not_ours() {
        for id in [
            "e1",
            "sd_vol1",
            "sd___node",
            "sd_vol1__",
            "sd_vol1__Node",
            "xsd_vol1__node",
            "sd_a__b__c",
        ] {
            assert_eq!(parse_export_id(id), None, "{id}");
        }
    }

    #[test]
    fn block_node_names_fit_qemu() {
        assert_eq!(block_node_name("vol1"), "sd-vol1");
        let at_limit = "x".repeat(28);
        assert_eq!(block_node_name(&at_limit), format!("sd-{at_limit}"));
        let long = "x".repeat(29);
        let hashed = block_node_name(&long);
        assert_eq!(hashed.len(), 19);
        assert!(hashed.starts_with("sd_"));
        assert_eq!(hashed, block_node_name(&long), "stable");
        assert_ne!(hashed, block_node_name(&"x".repeat(30)));
        assert!(block_node_name(&"y".repeat(MAX_HANDLE_LEN)).len() <= MAX_BLOCK_NODE_NAME_LEN);
    }

    #[test]
    fn fnv_matches_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn uri_encoding() {
        assert_eq!(uri_encode("/run/qsd/nbd.sock"), "/run/qsd/nbd.sock");
        assert_eq!(uri_encode("/a b/c&d?e"), "/a%20b/c%26d%3Fe");
    }
}
