//! RFC 9162 (Certificate Transparency 2.0) Merkle tree hashing, inclusion and consistency
//! proofs, and their verification.
//!
//! The tree itself is stored elsewhere as the hashes of its *perfect* subtrees (aligned,
//! power-of-two sized); [`NodeSource`] is how the proof builders read them. Any range
//! `MTH(D[a:b])` the RFC's algorithms need decomposes into O(log n) such subtrees.

use ring::digest::{Context, SHA256};

pub type Hash = [u8; 32];

/// `MTH({})`: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    sha256(&[])
}

fn sha256(data: &[u8]) -> Hash {
    ring::digest::digest(&SHA256, data)
        .as_ref()
        .try_into()
        .expect("32 bytes")
}

/// `HASH(0x00 || d)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0]);
    ctx.update(data);
    ctx.finish().as_ref().try_into().expect("32 bytes")
}

/// `HASH(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[1]);
    ctx.update(left);
    ctx.update(right);
    ctx.finish().as_ref().try_into().expect("32 bytes")
}

/// The largest power of two strictly smaller than `n` (n >= 2).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// Read access to the hashes of perfect subtrees: `node(level, index)` is the root of the
/// subtree over leaves `[index << level, (index + 1) << level)`.
pub trait NodeSource {
    type Error;
    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error>;
}

/// `MTH(D[start:end])`.
pub fn range_hash<S: NodeSource>(s: &S, start: u64, end: u64) -> Result<Hash, S::Error> {
    let n = end - start;
    if n == 0 {
        return Ok(empty_root());
    }
    if n.is_power_of_two() && start % n == 0 {
        return s.node(n.trailing_zeros(), start / n);
    }
    let k = split(n);
    let left = range_hash(s, start, start + k)?;
    let right = range_hash(s, start + k, end)?;
    Ok(node_hash(&left, &right))
}

/// The root of a tree of `size` leaves.
pub fn root<S: NodeSource>(s: &S, size: u64) -> Result<Hash, S::Error> {
    range_hash(s, 0, size)
}

/// `PATH(m, D[0:n])` (RFC 9162 2.1.3.1), leaf to root order.
pub fn inclusion_proof<S: NodeSource>(s: &S, index: u64, size: u64) -> Result<Vec<Hash>, S::Error> {
    assert!(index < size, "leaf {index} is not in a tree of {size}");
    let mut proof = Vec::new();
    path(s, index, 0, size, &mut proof)?;
    Ok(proof)
}

fn path<S: NodeSource>(
    s: &S,
    m: u64,
    start: u64,
    end: u64,
    out: &mut Vec<Hash>,
) -> Result<(), S::Error> {
    let n = end - start;
    if n <= 1 {
        return Ok(());
    }
    let k = split(n);
    if m < k {
        path(s, m, start, start + k, out)?;
        out.push(range_hash(s, start + k, end)?);
    } else {
        path(s, m - k, start + k, end, out)?;
        out.push(range_hash(s, start, start + k)?);
    }
    Ok(())
}

/// `PROOF(m, D[0:n])` (RFC 9162 2.1.4.1).
pub fn consistency_proof<S: NodeSource>(
    s: &S,
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>, S::Error> {
    assert!(old_size <= new_size);
    let mut proof = Vec::new();
    if old_size > 0 && old_size < new_size {
        subproof(s, old_size, 0, new_size, true, &mut proof)?;
    }
    Ok(proof)
}

fn subproof<S: NodeSource>(
    s: &S,
    m: u64,
    start: u64,
    end: u64,
    complete: bool,
    out: &mut Vec<Hash>,
) -> Result<(), S::Error> {
    let n = end - start;
    if m == n {
        if !complete {
            out.push(range_hash(s, start, end)?);
        }
        return Ok(());
    }
    let k = split(n);
    if m <= k {
        subproof(s, m, start, start + k, complete, out)?;
        out.push(range_hash(s, start + k, end)?);
    } else {
        subproof(s, m - k, start + k, end, false, out)?;
        out.push(range_hash(s, start, start + k)?);
    }
    Ok(())
}

/// Why a proof did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("index {index} is not below tree size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("proof has {got} hashes, expected {want}")]
    WrongLength { got: usize, want: usize },
    #[error("proof does not lead to the expected root")]
    RootMismatch,
    #[error("old size {old} is larger than new size {new}")]
    SizesOutOfOrder { old: u64, new: u64 },
    #[error("trees of equal size {size} with different roots")]
    EqualSizeDifferentRoots { size: u64 },
}

/// Verifies an inclusion proof (RFC 9162 2.1.3.2).
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let mut fn_ = index;
    let mut sn = size - 1;
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(ProofError::WrongLength {
                got: proof.len(),
                want: inclusion_len(index, size),
            });
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongLength {
            got: proof.len(),
            want: inclusion_len(index, size),
        });
    }
    if &r != root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

fn inclusion_len(index: u64, size: u64) -> usize {
    let (mut fn_, mut sn, mut len) = (index, size - 1, 0);
    while sn != 0 {
        if fn_ & 1 == 0 && fn_ == sn {
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        }
        fn_ >>= 1;
        sn >>= 1;
        len += 1;
    }
    len
}

/// Verifies a consistency proof between an old and a new tree (RFC 9162 2.1.4.2).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizesOutOfOrder {
            old: old_size,
            new: new_size,
        });
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength {
                got: proof.len(),
                want: 0,
            });
        }
        if old_root != new_root {
            return Err(ProofError::EqualSizeDifferentRoots { size: old_size });
        }
        return Ok(());
    }
    if old_size == 0 {
        // Every tree extends the empty one.
        if !proof.is_empty() {
            return Err(ProofError::WrongLength {
                got: proof.len(),
                want: 0,
            });
        }
        return Ok(());
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if old_size.is_power_of_two() {
        path.insert(0, *old_root);
    }
    let Some((first, rest)) = path.split_first() else {
        return Err(ProofError::WrongLength { got: 0, want: 1 });
    };
    let mut fn_ = old_size - 1;
    let mut sn = new_size - 1;
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let mut fr = *first;
    let mut sr = *first;
    for c in rest {
        if sn == 0 {
            return Err(ProofError::WrongLength {
                got: proof.len(),
                want: proof.len() - 1,
            });
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongLength {
            got: proof.len(),
            want: proof.len() + 1,
        });
    }
    if &fr != old_root || &sr != new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// An in-memory tree over leaf hashes (tests, `audit verify` recomputation).
#[derive(Default, Clone)]
pub struct MemoryTree {
    /// `levels[l][i]` = node(l, i) for every complete subtree.
    levels: Vec<Vec<Hash>>,
}

impl MemoryTree {
    pub fn push(&mut self, leaf: Hash) {
        let mut level = 0;
        let mut hash = leaf;
        loop {
            if self.levels.len() == level {
                self.levels.push(Vec::new());
            }
            self.levels[level].push(hash);
            let len = self.levels[level].len();
            if len % 2 == 1 {
                break;
            }
            hash = node_hash(&self.levels[level][len - 2], &self.levels[level][len - 1]);
            level += 1;
        }
    }

    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    pub fn root(&self) -> Hash {
        root(self, self.size()).expect("in memory")
    }
}

impl NodeSource for MemoryTree {
    type Error = std::convert::Infallible;
    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error> {
        Ok(self.levels[level as usize][index as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hd(s: &str) -> Hash {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    /// The leaves and roots of the certificate-transparency reference test suite
    /// (`testonly/constants.go`), which every RFC 6962/9162 implementation checks against.
    fn ct_leaves() -> Vec<Vec<u8>> {
        [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ]
        .iter()
        .map(|h| hex::decode(h).unwrap())
        .collect()
    }

    const CT_ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    fn ct_tree(size: usize) -> MemoryTree {
        let mut t = MemoryTree::default();
        for leaf in &ct_leaves()[..size] {
            t.push(leaf_hash(leaf));
        }
        t
    }

    #[test]
    fn roots_match_the_reference_vectors() {
        assert_eq!(empty_root(), hd(CT_ROOTS[0]));
        for (size, want) in CT_ROOTS.iter().enumerate() {
            assert_eq!(ct_tree(size).root(), hd(want), "size {size}");
        }
    }

    #[test]
    fn inclusion_proofs_match_the_reference_vectors() {
        let tree = ct_tree(8);
        let cases: [(u64, [&str; 3]); 2] = [
            (
                0,
                [
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                [
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        for (index, want) in cases {
            let proof = inclusion_proof(&tree, index, 8).unwrap();
            assert_eq!(proof, want.map(hd).to_vec(), "leaf {index}");
            let leaf = leaf_hash(&ct_leaves()[index as usize]);
            verify_inclusion(index, 8, &leaf, &proof, &hd(CT_ROOTS[8])).unwrap();
        }
    }

    #[test]
    fn consistency_proofs_match_the_reference_vectors() {
        let cases: [(u64, u64, &[&str]); 4] = [
            (1, 1, &[]),
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        let tree = ct_tree(8);
        for (old, new, want) in cases {
            let proof = consistency_proof(&tree, old, new).unwrap();
            let want: Vec<Hash> = want.iter().map(|h| hd(h)).collect();
            assert_eq!(proof, want, "{old} -> {new}");
            verify_consistency(
                old,
                new,
                &hd(CT_ROOTS[old as usize]),
                &hd(CT_ROOTS[new as usize]),
                &proof,
            )
            .unwrap();
        }
    }

    #[test]
    fn every_proof_up_to_70_leaves_verifies_and_every_tamper_fails() {
        let mut tree = MemoryTree::default();
        let mut roots = vec![empty_root()];
        let mut leaves = Vec::new();
        for i in 0..70u32 {
            let leaf = leaf_hash(&i.to_be_bytes());
            leaves.push(leaf);
            tree.push(leaf);
            roots.push(tree.root());
        }
        let bad = [0x55u8; 32];
        for size in 1..=70u64 {
            for index in 0..size {
                let proof = inclusion_proof(&tree, index, size).unwrap();
                let leaf = &leaves[index as usize];
                let root = &roots[size as usize];
                verify_inclusion(index, size, leaf, &proof, root).unwrap();
                assert!(verify_inclusion(index, size, &bad, &proof, root).is_err());
                if !proof.is_empty() {
                    let mut p = proof.clone();
                    p[0][0] ^= 1;
                    assert!(verify_inclusion(index, size, leaf, &p, root).is_err());
                    assert!(verify_inclusion(index, size, leaf, &proof[1..], root).is_err());
                }
                let mut longer = proof.clone();
                longer.push(bad);
                assert!(verify_inclusion(index, size, leaf, &longer, root).is_err());
            }
            for old in 0..=size {
                let proof = consistency_proof(&tree, old, size).unwrap();
                let (r_old, r_new) = (&roots[old as usize], &roots[size as usize]);
                verify_consistency(old, size, r_old, r_new, &proof).unwrap();
                if old > 0 && old < size {
                    assert!(verify_consistency(old, size, &bad, r_new, &proof).is_err());
                    assert!(verify_consistency(old, size, r_old, &bad, &proof).is_err());
                    let mut p = proof.clone();
                    p.last_mut().unwrap()[5] ^= 1;
                    assert!(verify_consistency(old, size, r_old, r_new, &p).is_err());
                }
            }
        }
    }

    #[test]
    fn a_fork_of_equal_size_is_refused() {
        let a = ct_tree(5).root();
        let mut other = ct_tree(4);
        other.push(leaf_hash(b"something else"));
        let err = verify_consistency(5, 5, &a, &other.root(), &[]).unwrap_err();
        assert_eq!(err, ProofError::EqualSizeDifferentRoots { size: 5 });
    }
}
