//! The microVM's initramfs: an uncompressed cpio (newc) archive of the asset tree `setup.sh`
//! prepares (busybox-static, the virtio modules, resize2fs and its libraries), the project's
//! `/init` (built into this binary, so the guest's behaviour is versioned with the host
//! agent), and the function's `/function/spec`, written at each start.
//!
//! The spec is a shell fragment the init sources. Every value in it comes from the image
//! config or the command line, so every value is single-quoted (a `'` becomes `'\''`): the
//! image cannot make the init run anything but its own process, as its own user, in its own
//! root. A NUL byte cannot be passed through a shell word, nor through execve: refused.

use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::bundle::ImageProcess;

/// The guest's `/init` (host-attach/microvm/init).
pub const INIT: &str = include_str!("../../microvm/init");

/// Why an initramfs could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("the microVM's initramfs tree {}: {source}", path.display())]
    Tree { path: PathBuf, source: io::Error },
    #[error("{} in the initramfs tree is larger than 4 GiB", path.display())]
    TooLarge { path: PathBuf },
    #[error("the image's {what} holds a NUL byte, which no process can be given")]
    Nul { what: &'static str },
    #[error("the image's Env entry {0:?} has no '='")]
    EnvWithoutValue(String),
    #[error("writing the initramfs: {0}")]
    Write(#[source] io::Error),
}

/// `value` as one single-quoted shell word.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn no_nul(value: &str, what: &'static str) -> Result<(), InitramfsError> {
    if value.contains('\0') {
        return Err(InitramfsError::Nul { what });
    }
    Ok(())
}

/// `/function/spec`: the user (resolved by the init in the image's own files), the working
/// directory, and `fn_exec`, which starts the process with exactly the image's environment,
/// no new privileges, chrooted into the mounted image with the user's ids and no
/// supplementary groups.
pub fn spec(process: &ImageProcess) -> Result<String, InitramfsError> {
    no_nul(&process.user, "User")?;
    no_nul(&process.cwd, "WorkingDir")?;
    let mut env = Vec::with_capacity(process.env.len());
    for e in &process.env {
        no_nul(e, "Env")?;
        if !e.contains('=') {
            return Err(InitramfsError::EnvWithoutValue(e.clone()));
        }
        env.push(shell_quote(e));
    }
    let mut args = Vec::with_capacity(process.args.len());
    for a in &process.args {
        no_nul(a, "command")?;
        args.push(shell_quote(a));
    }
    // Absolute busybox paths: the image's PATH (set by env -i) may not reach /bin of the
    // initramfs; the image's own PATH is what nsenter's exec searches, inside its root.
    Ok(format!(
        "FN_USER={}\nFN_CWD={}\n\
         fn_exec() {{ /bin/busybox env -i {} /bin/busybox setpriv --nnp /bin/busybox nsenter -r/mnt \"-w/mnt$FN_CWD\" -S \"$uid\" -G \"$gid\" -F -- {}; }}\n",
        shell_quote(&process.user),
        shell_quote(&process.cwd),
        env.join(" "),
        args.join(" "),
    ))
}

/// Writes the initramfs of `tree` (recursively: directories, files with their modes,
/// symbolic links; owned by root), `/init` and `/function/spec` to `out`.
pub fn write(tree: &Path, spec: &str, out: impl Write) -> Result<(), InitramfsError> {
    let mut archive = Archive {
        out: Some(out),
        ino: 1,
    };
    // Mount points and the console the kernel opens for the init.
    for dir in ["dev", "proc", "sys", "mnt", "tmp"] {
        archive.directory(dir, 0o755)?;
    }
    archive.console()?;
    archive.tree(tree, tree)?;
    archive.directory("function", 0o755)?;
    archive.file("init", 0o755, INIT.as_bytes())?;
    archive.file("function/spec", 0o644, spec.as_bytes())?;
    let out = archive.out.take().expect("held between entries");
    cpio::newc::trailer(out).map_err(InitramfsError::Write)?;
    Ok(())
}

struct Archive<W: Write> {
    /// cpio's writer takes the output by value; held here between entries.
    out: Option<W>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl<W: Write> Archive<W> {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<(), InitramfsError> {
        let size = u32::try_from(data.len()).map_err(|_| InitramfsError::TooLarge {
            path: PathBuf::from(name),
        })?;
        self.ino += 1;
        let out = self.out.take().expect("held between entries");
        let mut writer = cpio::newc::Builder::new(name)
            .ino(self.ino)
            .mode(mode)
            .nlink(if mode & S_IFDIR != 0 { 2 } else { 1 })
            .write(out, size);
        writer.write_all(data).map_err(InitramfsError::Write)?;
        self.out = Some(writer.finish().map_err(InitramfsError::Write)?);
        Ok(())
    }

    /// `/dev/console` (character device 5:1).
    fn console(&mut self) -> Result<(), InitramfsError> {
        self.ino += 1;
        let out = self.out.take().expect("held between entries");
        let writer = cpio::newc::Builder::new("dev/console")
            .ino(self.ino)
            .mode(S_IFCHR | 0o600)
            .nlink(1)
            .rdev_major(5)
            .rdev_minor(1)
            .write(out, 0);
        self.out = Some(writer.finish().map_err(InitramfsError::Write)?);
        Ok(())
    }

    fn directory(&mut self, name: &str, perm: u32) -> Result<(), InitramfsError> {
        self.entry(name, S_IFDIR | perm, &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), InitramfsError> {
        self.entry(name, S_IFREG | perm, data)
    }

    fn tree(&mut self, root: &Path, dir: &Path) -> Result<(), InitramfsError> {
        let tree_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| InitramfsError::Tree { path, source }
        };
        let mut entries = std::fs::read_dir(dir)
            .map_err(tree_error(dir))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(tree_error(dir))?;
        // The same tree gives the same archive.
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let name = path
                .strip_prefix(root)
                .expect("under the root")
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&path).map_err(tree_error(&path))?;
            let perm = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).map_err(tree_error(&path))?;
                self.entry(
                    &name,
                    S_IFLNK | 0o777,
                    target.as_os_str().as_encoded_bytes(),
                )?;
            } else if meta.is_dir() {
                self.directory(&name, perm)?;
                self.tree(root, &path)?;
            } else if meta.is_file() {
                if meta.size() > u64::from(u32::MAX) {
                    return Err(InitramfsError::TooLarge { path });
                }
                let data = std::fs::read(&path).map_err(tree_error(&path))?;
                self.file(&name, perm, &data)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn process() -> ImageProcess {
        ImageProcess {
            args: vec!["/bin/sh".into(), "-c".into(), "echo 'hi'; exit 3".into()],
            env: vec!["PATH=/bin".into(), "GREETING=it's $HOME `id`".into()],
            cwd: "/srv/my app".into(),
            user: "app:staff".into(),
        }
    }

    #[test]
    fn every_value_of_the_spec_is_one_quoted_word_that_a_shell_gives_back_as_it_was() {
        let spec = spec(&process()).unwrap();
        assert!(
            spec.starts_with("FN_USER='app:staff'\nFN_CWD='/srv/my app'\n"),
            "{spec}"
        );
        // Run the spec's fn_exec through a real shell with busybox replaced by a tool that
        // prints its arguments: each comes back byte for byte, nothing is expanded.
        let dir = tempfile::tempdir().unwrap();
        let printer = dir.path().join("busybox");
        std::fs::write(
            &printer,
            "#!/bin/sh\nfor a; do printf '[%s]' \"$a\"; done\n",
        )
        .unwrap();
        std::fs::set_permissions(&printer, std::fs::Permissions::from_mode(0o755)).unwrap();
        let printed_spec = spec.replace("/bin/busybox", &printer.display().to_string());
        std::fs::write(dir.path().join("spec"), &printed_spec).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(". \"$T/spec\"; uid=7; gid=8; fn_exec")
            .env("T", dir.path())
            .output()
            .unwrap();
        let out = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            out,
            "[env][-i][PATH=/bin][GREETING=it's $HOME `id`]".to_string()
                + &format!("[{}][setpriv][--nnp]", printer.display())
                + &format!(
                    "[{}][nsenter][-r/mnt][-w/mnt/srv/my app][-S][7][-G][8][-F][--]",
                    printer.display()
                )
                + "[/bin/sh][-c][echo 'hi'; exit 3]"
        );
    }

    #[test]
    fn nul_bytes_and_env_without_value_are_refused() {
        let mut p = process();
        p.args.push("a\0b".into());
        assert_eq!(
            spec(&p).unwrap_err().to_string(),
            "the image's command holds a NUL byte, which no process can be given"
        );
        let mut p = process();
        p.env.push("JUSTANAME".into());
        assert_eq!(
            spec(&p).unwrap_err().to_string(),
            "the image's Env entry \"JUSTANAME\" has no '='"
        );
        let mut p = process();
        p.user = "a\0".into();
        assert!(spec(&p).unwrap_err().to_string().contains("User"));
    }

    #[test]
    fn the_archive_holds_the_tree_the_init_and_the_spec() {
        let tree = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tree.path().join("lib/modules")).unwrap();
        std::fs::create_dir_all(tree.path().join("bin")).unwrap();
        std::fs::write(tree.path().join("lib/modules/virtio.ko"), b"module").unwrap();
        std::fs::write(tree.path().join("bin/busybox"), b"\x7fELF").unwrap();
        std::fs::set_permissions(
            tree.path().join("bin/busybox"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("busybox", tree.path().join("bin/sh")).unwrap();
        let mut archive = Vec::new();
        write(tree.path(), "FN_USER=''\n", &mut archive).unwrap();

        let mut entries = Vec::new();
        let mut rest = archive.as_slice();
        loop {
            let mut reader = cpio::NewcReader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let (name, mode) = (reader.entry().name().to_string(), reader.entry().mode());
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            entries.push((name, mode, data));
            rest = reader.finish().unwrap();
        }
        let find = |n: &str| {
            entries
                .iter()
                .find(|e| e.0 == n)
                .unwrap_or_else(|| panic!("{n}: {entries:?}"))
        };
        assert_eq!(find("bin/busybox").1, S_IFREG | 0o755);
        assert_eq!(find("bin/busybox").2, b"\x7fELF");
        assert_eq!(find("bin/sh").1, S_IFLNK | 0o777);
        assert_eq!(find("bin/sh").2, b"busybox");
        assert_eq!(find("lib/modules").1 & S_IFDIR, S_IFDIR);
        assert_eq!(find("lib/modules/virtio.ko").2, b"module");
        assert_eq!(find("init").1, S_IFREG | 0o755);
        assert_eq!(find("init").2, INIT.as_bytes());
        assert_eq!(find("function/spec").2, b"FN_USER=''\n");
        assert_eq!(find("dev/console").1, S_IFCHR | 0o600);
        for dir in ["dev", "proc", "sys", "mnt"] {
            assert_eq!(find(dir).1 & S_IFDIR, S_IFDIR, "{dir}");
        }
        // Directories come before what they hold.
        let pos = |n: &str| entries.iter().position(|e| e.0 == n).unwrap();
        assert!(
            pos("lib") < pos("lib/modules") && pos("lib/modules") < pos("lib/modules/virtio.ko")
        );
        assert!(pos("function") < pos("function/spec"));
    }
}
