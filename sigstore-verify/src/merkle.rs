//! RFC 6962 / RFC 9162 Merkle tree hashing and inclusion proof verification (§2.1.3.2).

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MerkleError {
    #[error("leaf index {index} is not inside a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("proof has {0} hashes, which is the wrong length for this index and tree size")]
    WrongLength(usize),
    #[error("proof hash {0} is not 32 bytes")]
    BadHash(usize),
    #[error("root hash is not 32 bytes")]
    BadRoot,
    #[error("computed root {computed} differs from the proof's root {expected}")]
    RootMismatch { computed: String, expected: String },
}

/// `SHA-256(0x00 || leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(leaf);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &[u8], right: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root an inclusion proof leads to from `leaf_hash` at `index` in a tree of `size`.
pub fn root_from_inclusion_proof(
    index: u64,
    size: u64,
    leaf_hash: &[u8; 32],
    proof: &[Vec<u8>],
) -> Result<[u8; 32], MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf_hash;
    for (i, p) in proof.iter().enumerate() {
        if p.len() != 32 {
            return Err(MerkleError::BadHash(i));
        }
        if snode == 0 {
            return Err(MerkleError::WrongLength(proof.len()));
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(MerkleError::WrongLength(proof.len()));
    }
    Ok(r)
}

/// Verifies that `leaf_hash` is at `index` of the tree of `size` with root `root`.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf_hash: &[u8; 32],
    proof: &[Vec<u8>],
    root: &[u8],
) -> Result<(), MerkleError> {
    if root.len() != 32 {
        return Err(MerkleError::BadRoot);
    }
    let computed = root_from_inclusion_proof(index, size, leaf_hash, proof)?;
    if computed[..] != *root {
        return Err(MerkleError::RootMismatch {
            computed: hex::encode(computed),
            expected: hex::encode(root),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6962 Merkle tree hash of `leaves` (the reference definition, recursive).
    fn mth(leaves: &[Vec<u8>]) -> [u8; 32] {
        match leaves.len() {
            0 => Sha256::digest([]).into(),
            1 => leaf_hash(&leaves[0]),
            n => {
                let k = n.next_power_of_two() / 2;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    /// RFC 6962 PATH(m, D[n]).
    fn path(m: usize, leaves: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let n = leaves.len();
        if n <= 1 {
            return vec![];
        }
        let k = n.next_power_of_two() / 2;
        if m < k {
            let mut p = path(m, &leaves[..k]);
            p.push(mth(&leaves[k..]).to_vec());
            p
        } else {
            let mut p = path(m - k, &leaves[k..]);
            p.push(mth(&leaves[..k]).to_vec());
            p
        }
    }

    #[test]
    fn every_leaf_of_every_small_tree_verifies() {
        for n in 1..=33usize {
            let leaves: Vec<Vec<u8>> = (0..n).map(|i| format!("leaf {i}").into_bytes()).collect();
            let root = mth(&leaves);
            for m in 0..n {
                let p = path(m, &leaves);
                let lh = leaf_hash(&leaves[m]);
                verify_inclusion(m as u64, n as u64, &lh, &p, &root).unwrap();
                // A flipped bit in any proof hash, the wrong index, or a truncated proof fail.
                for j in 0..p.len() {
                    let mut bad = p.clone();
                    bad[j][0] ^= 1;
                    assert!(verify_inclusion(m as u64, n as u64, &lh, &bad, &root).is_err());
                }
                if n > 1 {
                    let other = ((m + 1) % n) as u64;
                    assert!(verify_inclusion(other, n as u64, &lh, &p, &root).is_err());
                    assert!(
                        verify_inclusion(m as u64, n as u64, &lh, &p[..p.len() - 1], &root)
                            .is_err()
                    );
                }
                let mut long = p.clone();
                long.push(vec![0; 32]);
                assert!(verify_inclusion(m as u64, n as u64, &lh, &long, &root).is_err());
            }
        }
    }

    #[test]
    fn index_outside_tree_is_refused() {
        let lh = leaf_hash(b"x");
        assert_eq!(
            verify_inclusion(1, 1, &lh, &[], &lh),
            Err(MerkleError::IndexOutOfRange { index: 1, size: 1 })
        );
    }
}
