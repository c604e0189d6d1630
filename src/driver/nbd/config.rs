//! Where the `nbd` driver finds its daemon and its images.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The longest path a unix socket address can hold (`sun_path` less its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The `nbd` section of a driver entry in the operator's configuration file.
///
/// The operator and the daemon must see the same file system at these paths: the operator checks
/// that a volume's image exists before asking the daemon to open it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NbdConfig {
    /// The daemon's QMP monitor socket (`--chardev socket,...,server=on --monitor`).
    pub qmp_socket: PathBuf,
    /// Where the daemon's NBD server listens. The driver starts the server there on the first
    /// attach; a server the daemon already runs is used as it is.
    pub nbd_socket: PathBuf,
    /// The folder of volume images: a volume handle is the name of a raw image file in it.
    pub image_dir: PathBuf,
}

/// A configuration the driver cannot work with. The message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct NbdConfigError {
    pub field: &'static str,
    pub message: String,
}

impl NbdConfig {
    /// Checks what can be checked before the daemon is reached: the sockets are absolute paths
    /// short enough for a socket address (the daemon need not be running yet), and the image
    /// folder exists.
    pub fn validate(&self) -> Result<(), NbdConfigError> {
        socket_path("qmpSocket", &self.qmp_socket)?;
        socket_path("nbdSocket", &self.nbd_socket)?;
        let error = |message: String| NbdConfigError {
            field: "imageDir",
            message,
        };
        absolute("imageDir", &self.image_dir)?;
        match std::fs::metadata(&self.image_dir) {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(error(format!(
                "{} is not a directory",
                self.image_dir.display()
            ))),
            Err(e) => Err(error(format!(
                "cannot use {}: {e}",
                self.image_dir.display()
            ))),
        }
    }
}

fn absolute(field: &'static str, path: &Path) -> Result<(), NbdConfigError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(NbdConfigError {
            field,
            message: format!("{:?} must be an absolute path", path.display().to_string()),
        })
    }
}

fn socket_path(field: &'static str, path: &Path) -> Result<(), NbdConfigError> {
    absolute(field, path)?;
    let error = |message: String| NbdConfigError { field, message };
    // The path travels to the daemon in JSON and to clients in a URI, both of which need text.
    let Some(text) = path.to_str() else {
        return Err(error(format!("{} is not valid UTF-8", path.display())));
    };
    if text.len() > MAX_SOCKET_PATH {
        return Err(error(format!(
            "{text} is longer than the {MAX_SOCKET_PATH} bytes a unix socket path may have"
        )));
    }
    if path.is_dir() {
        return Err(error(format!("{text} is a directory, not a socket path")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> NbdConfig {
        NbdConfig {
            qmp_socket: dir.join("qmp.sock"),
            nbd_socket: dir.join("nbd.sock"),
            image_dir: dir.to_owned(),
        }
    }

    #[test]
    fn deserializes_camel_case_and_rejects_unknown_fields() {
        let parsed: NbdConfig = serde_json::from_str(
            r#"{"qmpSocket":"/q.sock","nbdSocket":"/n.sock","imageDir":"/img"}"#,
        )
        .unwrap();
        assert_eq!(parsed.qmp_socket, PathBuf::from("/q.sock"));
        assert_eq!(parsed.nbd_socket, PathBuf::from("/n.sock"));
        assert_eq!(parsed.image_dir, PathBuf::from("/img"));
        let unknown = serde_json::from_str::<NbdConfig>(
            r#"{"qmpSocket":"/q.sock","nbdSocket":"/n.sock","imageDir":"/img","extra":1}"#,
        );
        assert!(unknown.unwrap_err().to_string().contains("extra"));
        assert!(serde_json::from_str::<NbdConfig>(r#"{"qmpSocket":"/q.sock"}"#).is_err());
    }

    #[test]
    fn validation() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(config(dir.path()).validate(), Ok(()));

        let missing = NbdConfig {
            image_dir: dir.path().join("nope"),
            ..config(dir.path())
        };
        assert_eq!(missing.validate().unwrap_err().field, "imageDir");

        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let not_dir = NbdConfig {
            image_dir: file,
            ..config(dir.path())
        };
        let error = not_dir.validate().unwrap_err();
        assert_eq!(error.field, "imageDir");
        assert!(error.to_string().contains("is not a directory"), "{error}");

        let relative = NbdConfig {
            qmp_socket: "qmp.sock".into(),
            ..config(dir.path())
        };
        assert_eq!(relative.validate().unwrap_err().field, "qmpSocket");

        let long = NbdConfig {
            nbd_socket: PathBuf::from(format!("/{}", "s".repeat(200))),
            ..config(dir.path())
        };
        assert_eq!(long.validate().unwrap_err().field, "nbdSocket");

        let dir_socket = NbdConfig {
            nbd_socket: dir.path().to_owned(),
            ..config(dir.path())
        };
        assert_eq!(dir_socket.validate().unwrap_err().field, "nbdSocket");
    }
}
