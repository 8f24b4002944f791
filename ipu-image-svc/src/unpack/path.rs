//! Layer entry paths, checked before anything touches the file system.
//!
//! A tar path is accepted only if it stays inside the tree by construction: relative, no `..`
//! component, no NUL. `.` components and leading `./` are dropped. Whether an intermediate
//! component is a symlink is checked later, one component at a time, against the image tree ([`super::tree`]).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// A path inside the image, as a list of plain components (never `.`, `..` or empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EntryPath {
    components: Vec<Vec<u8>>,
}

/// Why a path was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathRefusal {
    Absolute,
    ParentComponent,
    Nul,
}

impl PathRefusal {
    pub fn describe(&self) -> &'static str {
        match self {
            PathRefusal::Absolute => "is absolute",
            PathRefusal::ParentComponent => "has a `..` component",
            PathRefusal::Nul => "contains a NUL byte",
        }
    }
}

impl EntryPath {
    /// Parses a tar member or hardlink target path.
    pub fn parse(raw: &[u8]) -> Result<Self, PathRefusal> {
        if raw.contains(&0) {
            return Err(PathRefusal::Nul);
        }
        if raw.first() == Some(&b'/') {
            return Err(PathRefusal::Absolute);
        }
        let mut components = Vec::new();
        for c in raw.split(|&b| b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => return Err(PathRefusal::ParentComponent),
                c => components.push(c.to_vec()),
            }
        }
        Ok(Self { components })
    }

    /// The image root itself (`./` in many tars).
    pub fn is_root(&self) -> bool {
        self.components.is_empty()
    }

    pub fn all_components(&self) -> &[Vec<u8>] {
        &self.components
    }

    pub fn parent_components(&self) -> &[Vec<u8>] {
        match self.components.split_last() {
            Some((_, parent)) => parent,
            None => &[],
        }
    }

    /// The last component; `None` for the root.
    pub fn file_name(&self) -> Option<&OsStr> {
        self.components.last().map(|c| OsStr::from_bytes(c))
    }

    /// The parent path (the root's parent is the root).
    pub fn parent(&self) -> EntryPath {
        EntryPath {
            components: self.parent_components().to_vec(),
        }
    }

    pub fn join(&self, name: &[u8]) -> EntryPath {
        let mut components = self.components.clone();
        components.push(name.to_vec());
        EntryPath { components }
    }

    /// `/a/b` form, for messages.
    pub fn display(&self) -> String {
        let mut s = String::new();
        for c in &self.components {
            s.push('/');
            s.push_str(&String::from_utf8_lossy(c));
        }
        if s.is_empty() {
            s.push('/');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_paths() {
        let p = EntryPath::parse(b"./usr//bin/./sh").unwrap();
        assert_eq!(p.display(), "/usr/bin/sh");
        assert_eq!(p.file_name().unwrap(), "sh");
        assert_eq!(p.parent().display(), "/usr/bin");
        assert!(EntryPath::parse(b"./").unwrap().is_root());
        assert!(EntryPath::parse(b"dir/").unwrap().file_name().unwrap() == "dir");
    }

    #[test]
    fn escapes_refused() {
        assert_eq!(
            EntryPath::parse(b"../../escape.txt"),
            Err(PathRefusal::ParentComponent)
        );
        assert_eq!(
            EntryPath::parse(b"a/../../b"),
            Err(PathRefusal::ParentComponent)
        );
        assert_eq!(EntryPath::parse(b"a/.."), Err(PathRefusal::ParentComponent));
        assert_eq!(
            EntryPath::parse(b"/abs-escape.txt"),
            Err(PathRefusal::Absolute)
        );
        assert_eq!(EntryPath::parse(b"a\0b"), Err(PathRefusal::Nul));
        // `..` inside a name is just a name.
        assert!(EntryPath::parse(b"a/..b/c..").is_ok());
    }
}
