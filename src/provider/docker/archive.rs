//! Tar archives, the form in which the engine moves files in and out of containers. Everything
//! here blocks and runs in `spawn_blocking`.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Room for the headers and padding of a one-file archive: a header block, extended headers for
/// long names, padding to 512 bytes and two end blocks need a few KiB; 64 KiB is a wide margin.
pub(super) const OVERHEAD_BYTES: u64 = 64 * 1024;

/// What a one-file archive from the engine holds.
pub(super) enum SingleFile {
    Content(Vec<u8>),
    /// More than the limit: the size found.
    TooLarge(u64),
    /// A link, a folder or a special file took the place of the file.
    NotRegular,
}

/// Reads the first entry of `archived`, at most `max_bytes` of it.
pub(super) fn single_file_blocking(archived: &[u8], max_bytes: u64) -> Result<SingleFile> {
    let mut archive = tar::Archive::new(archived);
    let mut entries = archive.entries().map_err(invalid_archive)?;
    let Some(entry) = entries.next() else {
        return Ok(SingleFile::NotRegular);
    };
    let entry = entry.map_err(invalid_archive)?;
    if !entry.header().entry_type().is_file() {
        return Ok(SingleFile::NotRegular);
    }
    let size = entry.size();
    if size > max_bytes {
        return Ok(SingleFile::TooLarge(size));
    }
    let mut content = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    entry
        .take(max_bytes)
        .read_to_end(&mut content)
        .map_err(invalid_archive)?;
    Ok(SingleFile::Content(content))
}

/// Builds an archive that creates the folders `relative[..last]` (mode `folder_mode`) and the
/// file `relative` with `content` and `mode`.
pub(super) fn file_blocking(
    relative: &[String],
    content: &[u8],
    mode: u32,
    folder_mode: u32,
) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mtime = now_seconds();
    let mut path = String::new();
    for (index, name) in relative.iter().enumerate() {
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(name);
        let mut header = tar::Header::new_gnu();
        header.set_mtime(mtime);
        let is_file = index + 1 == relative.len();
        if is_file {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(mode);
            header.set_size(content.len() as u64);
            builder
                .append_data(&mut header, &path, content)
                .map_err(build_failed)?;
        } else {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(folder_mode);
            header.set_size(0);
            builder
                .append_data(&mut header, format!("{path}/"), std::io::empty())
                .map_err(build_failed)?;
        }
    }
    builder.into_inner().map_err(build_failed)
}

/// Builds an archive of the host folder `source` under the name `name`, keeping symbolic links
/// as links, modes and owners.
pub(super) fn tree_blocking(source: &Path, name: &str) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.append_dir_all(name, source).map_err(build_failed)?;
    builder.into_inner().map_err(build_failed)
}

/// Unpacks `archived` into the host folder `destination`, keeping modes and owners.
pub(super) fn unpack_blocking(archived: &[u8], destination: &Path) -> Result<()> {
    let mut archive = tar::Archive::new(archived);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.unpack(destination).map_err(|error| {
        Error::internal(
            format!(
                "cannot unpack a container archive into {}",
                destination.display()
            ),
            error,
        )
    })
}

fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

fn invalid_archive(error: std::io::Error) -> Error {
    Error::internal("cannot read an archive from the docker engine", error)
}

fn build_failed(error: std::io::Error) -> Error {
    Error::internal("cannot build an archive for the docker engine", error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_archive_round_trips_bytes() {
        let content: Vec<u8> = (0..1024).map(|index| (index % 256) as u8).collect();
        let relative = ["dir".to_owned(), "all.bytes".to_owned()];
        let archived = file_blocking(&relative, &content, 0o600, 0o755).expect("archive");

        let mut archive = tar::Archive::new(archived.as_slice());
        let names: Vec<String> = archive
            .entries()
            .expect("entries")
            .map(|entry| {
                let entry = entry.expect("entry");
                entry.path().expect("path").display().to_string()
            })
            .collect();
        assert_eq!(names, ["dir/", "dir/all.bytes"]);

        // The engine sends the file alone; an archive whose first entry is the file reads back.
        let single = file_blocking(&relative[1..], &content, 0o600, 0o755).expect("archive");
        let SingleFile::Content(read) = single_file_blocking(&single, 4096).expect("read") else {
            panic!("the entry is a regular file");
        };
        assert_eq!(read, content);
        assert!(matches!(
            single_file_blocking(&single, 100).expect("read"),
            SingleFile::TooLarge(1024)
        ));
    }
}
