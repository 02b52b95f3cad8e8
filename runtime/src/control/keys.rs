//! The job's certificate authority in its job directory: how every process of a job (the
//! controller, agents started by `flotilla launch` or by Slurm, rank processes) gets a
//! certificate without the CA's key crossing the network.
//!
//! `flotilla launch` (or the first agent of a Slurm job) creates the directory with mode 0700
//! and writes `ca.der` (the CA certificate) and `ca.key` (its PKCS#8 key, mode 0600); every
//! process of the job reads them and issues itself a certificate for its own name. Whoever can
//! read the directory can join the job: it must be readable by the job's user only (on a
//! cluster, a directory on the shared filesystem under that user's home).

use std::path::{Path, PathBuf};

use crate::fabric::quic::{JobCa, QuicError};

/// File name of the CA certificate in the job directory.
pub const CA_CERT: &str = "ca.der";
/// File name of the CA key in the job directory.
pub const CA_KEY: &str = "ca.key";

fn io_err(path: &Path, e: std::io::Error) -> QuicError {
    QuicError::Cert(format!("{}: {e}", path.display()))
}

/// Create `dir` (mode 0700) and write a fresh CA into it; an existing CA there is kept and
/// returned (a job directory is one job's).
pub fn create_ca(dir: &Path) -> Result<JobCa, QuicError> {
    if dir.join(CA_KEY).exists() {
        return load_ca(dir);
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    restrict(dir, 0o700)?;
    let ca = JobCa::generate()?;
    write_secret(&dir.join(CA_KEY), &ca.key_der())?;
    write_secret(&dir.join(CA_CERT), ca.cert_der().as_ref())?;
    Ok(ca)
}

/// The CA written by [`create_ca`]; an error names the file that is missing or malformed, or a
/// directory that others may read.
pub fn load_ca(dir: &Path) -> Result<JobCa, QuicError> {
    let key_path = dir.join(CA_KEY);
    check_private(dir)?;
    let key = std::fs::read(&key_path).map_err(|e| io_err(&key_path, e))?;
    JobCa::from_key_der(&key)
        .map_err(|e| QuicError::Cert(format!("{}: not a CA key: {e}", key_path.display())))
}

/// Wait up to `timeout` for another process to create the CA in `dir` (the other agents of a
/// Slurm job wait for the first), then load it.
pub fn wait_for_ca(dir: &Path, timeout: std::time::Duration) -> Result<JobCa, QuicError> {
    let start = std::time::Instant::now();
    let key: PathBuf = dir.join(CA_KEY);
    while !key.exists() {
        if start.elapsed() > timeout {
            return Err(QuicError::Cert(format!(
                "{} did not appear within {timeout:?}",
                key.display()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The writer renames the file into place, so it is whole once it exists.
    load_ca(dir)
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), QuicError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| io_err(&tmp, e))?;
    restrict(&tmp, 0o600)?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) -> Result<(), QuicError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_err(path, e))
}

#[cfg(not(unix))]
fn restrict(_path: &Path, _mode: u32) -> Result<(), QuicError> {
    Ok(())
}

/// Refuse a job directory that other users may read or enter.
#[cfg(unix)]
fn check_private(dir: &Path) -> Result<(), QuicError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)
        .map_err(|e| io_err(dir, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(QuicError::Cert(format!(
            "{}: the job directory holds the job's CA key, but its mode is {:o} (others may \
             read it); chmod 700 it",
            dir.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_dir: &Path) -> Result<(), QuicError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_written_and_read_back_issues_certificates_that_chain_to_it() {
        let dir = std::env::temp_dir().join(format!("flotilla-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = create_ca(&dir).expect("create");
        let again = load_ca(&dir).expect("load");
        // Same key: the rebuilt CA's certificate has the same subject and public key.
        assert_eq!(ca.key_der(), again.key_der());
        let stored = std::fs::read(dir.join(CA_CERT)).expect("cert");
        assert_eq!(stored, ca.cert_der().as_ref());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
            assert_eq!(mode(&dir).ok(), Some(0o700));
            assert_eq!(mode(&dir.join(CA_KEY)).ok(), Some(0o600));
            restrict(&dir, 0o755).expect("chmod");
            let err = load_ca(&dir).expect_err("readable by others");
            assert!(err.to_string().contains("chmod 700"), "{err}");
        }
        restrict(&dir, 0o700).expect("chmod");
        std::fs::write(dir.join(CA_KEY), b"junk").expect("write");
        let err = load_ca(&dir).expect_err("junk key");
        assert!(err.to_string().contains("ca.key: not a CA key"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
