//! Key pairs for publishers: ECDSA P-256 for signing, RSA or EC for JWE layer-key recipients.
//! Private keys are written as unencrypted PKCS#8 PEM with mode 0600; public keys as SPKI PEM.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use std::path::PathBuf;

use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use rand_core::OsRng;
use zeroize::Zeroizing;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyKind {
    #[value(name = "ec-p256")]
    EcP256,
    #[value(name = "ec-p384")]
    EcP384,
    #[value(name = "ec-p521")]
    EcP521,
    #[value(name = "rsa-2048")]
    Rsa2048,
    #[value(name = "rsa-3072")]
    Rsa3072,
    #[value(name = "rsa-4096")]
    Rsa4096,
}

/// Why a key pair could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyGenError {
    #[error("generating an RSA key: {0}")]
    Rsa(#[source] ocicrypt::Error),
    #[error("encoding the private key: {0}")]
    EncodePrivate(#[source] p256::pkcs8::Error),
    #[error("encoding the public key: {0}")]
    EncodePublic(#[source] p256::pkcs8::spki::Error),
    #[error("creating {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating {} (it must not exist yet): {source}", path.display())]
    CreateNew {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn pems(
    private: Result<Zeroizing<String>, p256::pkcs8::Error>,
    public: Result<String, p256::pkcs8::spki::Error>,
) -> Result<(Zeroizing<String>, String), KeyGenError> {
    Ok((
        private.map_err(KeyGenError::EncodePrivate)?,
        public.map_err(KeyGenError::EncodePublic)?,
    ))
}

/// PEM texts of a new key pair: (private PKCS#8, public SPKI).
pub fn generate(kind: KeyKind) -> Result<(Zeroizing<String>, String), KeyGenError> {
    let lf = LineEnding::LF;
    match kind {
        KeyKind::EcP256 => {
            let k = p256::SecretKey::random(&mut OsRng);
            pems(k.to_pkcs8_pem(lf), k.public_key().to_public_key_pem(lf))
        }
        KeyKind::EcP384 => {
            let k = p384::SecretKey::random(&mut OsRng);
            pems(k.to_pkcs8_pem(lf), k.public_key().to_public_key_pem(lf))
        }
        KeyKind::EcP521 => {
            let k = p521::SecretKey::random(&mut OsRng);
            pems(k.to_pkcs8_pem(lf), k.public_key().to_public_key_pem(lf))
        }
        KeyKind::Rsa2048 | KeyKind::Rsa3072 | KeyKind::Rsa4096 => {
            let bits = match kind {
                KeyKind::Rsa2048 => 2048,
                KeyKind::Rsa3072 => 3072,
                _ => 4096,
            };
            // aws-lc makes RSA keys; the `rsa` crate is not a dependency of the product.
            let private = ocicrypt::keys::generate_rsa_pkcs8_pem(bits).map_err(KeyGenError::Rsa)?;
            let public = ocicrypt::keys::PrivateKey::from_pem(private.as_bytes())
                .map_err(KeyGenError::Rsa)?
                .public_key()
                .to_pem();
            Ok((private, public))
        }
    }
}

/// Writes `DIR/priv.pem` (0600) and `DIR/pub.pem`; refuses to overwrite a private key.
pub fn write_pair(kind: KeyKind, dir: &Path) -> Result<(), KeyGenError> {
    let (private, public) = generate(kind)?;
    fs::create_dir_all(dir).map_err(|source| KeyGenError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let priv_path = dir.join("priv.pem");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&priv_path)
        .map_err(|source| KeyGenError::CreateNew {
            path: priv_path.clone(),
            source,
        })?;
    f.write_all(private.as_bytes())
        .map_err(|source| KeyGenError::Write {
            path: priv_path,
            source,
        })?;
    let pub_path = dir.join("pub.pem");
    fs::write(&pub_path, public).map_err(|source| KeyGenError::Write {
        path: pub_path,
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_pairs_are_made_by_aws_lc_and_open_what_they_wrap() {
        for (kind, bits) in [(KeyKind::Rsa2048, 2048), (KeyKind::Rsa3072, 3072)] {
            let (private, public) = generate(kind).unwrap();
            assert!(private.starts_with("-----BEGIN PRIVATE KEY-----"));
            let private = ocicrypt::keys::PrivateKey::from_pem(private.as_bytes()).unwrap();
            let public = ocicrypt::keys::PublicKey::from_pem(public.as_bytes()).unwrap();
            assert_eq!(private.as_rsa().unwrap().bits(), bits);
            assert_eq!(public.bits(), bits);
            let jwe = ocicrypt::jwe::wrap(b"{}", &[public]).unwrap();
            assert_eq!(&*ocicrypt::jwe::unwrap(&jwe, &[private]).unwrap(), b"{}");
        }
    }
}
