//! Small JSON files in the state directory (the CLI's change log, the edge lists): read with
//! "missing = empty", written so a crash leaves the old or the new file and never half of one,
//! and a lock that serialises the processes that change them (the agent and CLI invocations).
use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid {what}: {source}")]
    Parse {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_path_buf(), source }
}

/// Reads `path`; a missing file is `T::default()`. `what` names the file in errors.
pub fn load<T: DeserializeOwned + Default>(path: &Path, what: &'static str) -> Result<T, StateError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Parse { path: path.to_path_buf(), what, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(StateError::Io { path: path.to_path_buf(), source }),
    }
}

/// Writes `value` to `dir/name` atomically and durably (see [`write_atomic`]).
pub fn save<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), StateError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(name);
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| StateError::Io { path: path.clone(), source: e.into() })?;
    write_atomic(&path, &bytes)
}

/// Replaces `path` with `bytes` so a crash leaves the old or the new file, never half of one:
/// temp file beside it, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(())
}

/// An exclusive lock on `dir/name`, held until dropped (the file is closed).
#[derive(Debug)]
pub struct Lock {
    _file: fs::File,
}

/// Takes the lock `dir/name`, waiting for another holder.
pub fn lock(dir: &Path, name: &str) -> Result<Lock, StateError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(name);
    let file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
    file.lock().map_err(io(&path))?;
    Ok(Lock { _file: file })
}
