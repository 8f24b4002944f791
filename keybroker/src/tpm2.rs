//! TPM 2.0 marshalled structures as the broker reads them: a big-endian cursor, the algorithm
//! and structure tags it checks, and the object attribute bits (TPM 2.0 Library Part 2).
//! Shared by the quote verifier ([`crate::verifier`]) and MakeCredential
//! ([`crate::credential`]).

/// `TPM_GENERATED_VALUE`: the structure was made by a TPM.
pub const TPM_GENERATED: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_QUOTE`.
pub const ST_ATTEST_QUOTE: u16 = 0x8018;
/// `TPM_ALG_SHA256`.
pub const ALG_SHA256: u16 = 0x000b;
/// `TPM_ALG_ECC`.
pub const ALG_ECC: u16 = 0x0023;
/// `TPM_ALG_NULL`.
pub const ALG_NULL: u16 = 0x0010;
/// `TPM_ALG_ECDAA`.
pub const ALG_ECDAA: u16 = 0x001a;
/// `TPM_ECC_NIST_P256`.
pub const ECC_NIST_P256: u16 = 0x0003;

/// TPMA_OBJECT bits an attestation key must have (TPM 2.0 Part 2, 8.3).
pub mod object_attributes {
    pub const FIXED_TPM: u32 = 1 << 1;
    pub const FIXED_PARENT: u32 = 1 << 4;
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SIGN: u32 = 1 << 18;
}

/// A structure that does not parse: what was wrong, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

/// A cursor over TPM-marshalled (big-endian) structures.
pub(crate) struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Self { b, at: 0 }
    }

    /// Everything was read.
    pub(crate) fn done(&self) -> bool {
        self.at == self.b.len()
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.b.len() - self.at
    }

    pub(crate) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Malformed> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| Malformed(format!("{what}: needs {n} bytes at offset {}", self.at)))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, Malformed> {
        Ok(self.take(1, what)?[0])
    }
    pub(crate) fn u16(&mut self, what: &str) -> Result<u16, Malformed> {
        Ok(u16::from_be_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }
    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, Malformed> {
        Ok(u32::from_be_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, Malformed> {
        Ok(u64::from_be_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }
    pub(crate) fn tpm2b(&mut self, what: &str) -> Result<Vec<u8>, Malformed> {
        let n = self.u16(what)? as usize;
        Ok(self.take(n, what)?.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_says_what_is_short_and_where() {
        let mut r = Reader::new(&[0x00, 0x02, 0xaa, 0xbb, 0x01]);
        assert_eq!(r.tpm2b("x").unwrap(), vec![0xaa, 0xbb]);
        assert_eq!(r.remaining(), 1);
        assert_eq!(
            r.u16("y").unwrap_err(),
            Malformed("y: needs 2 bytes at offset 4".into())
        );
        assert_eq!(r.u8("z").unwrap(), 1);
        assert!(r.done());
    }
}
