//! Encrypting an image's layers with ocicrypt (what `skopeo copy --encryption-key` does).

use std::io::{self, BufReader};

use ocicrypt::{EncryptConfig, LayerEncryptor};

use crate::layout::{Descriptor, Layout, LayoutError};

/// Why an image could not be encrypted.
#[derive(Debug, thiserror::Error)]
pub enum EncryptError {
    #[error("tag {tag:?} has {count} layers; there is no layer {index}")]
    NoSuchLayer {
        tag: String,
        count: usize,
        index: usize,
    },
    #[error("layer {index} of {tag:?} is already encrypted")]
    AlreadyEncrypted { index: usize, tag: String },
    #[error("setting up layer encryption: {0}")]
    Setup(#[source] ocicrypt::Error),
    #[error("encrypting layer {index}: {source}")]
    Encrypting {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error("wrapping the layer key: {0}")]
    WrapKey(#[source] ocicrypt::Error),
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// Encrypts the layers of `tag` selected by `layers` (all when empty) to `recipients` and
/// tags the result `out_tag`. The config (diff_ids) does not change: it describes the
/// plaintext, which is what a consumer authenticates after decrypting.
pub fn encrypt(
    layout: &Layout,
    tag: &str,
    out_tag: &str,
    recipients: &EncryptConfig,
    layers: &[usize],
) -> Result<Descriptor, EncryptError> {
    let (_, mut manifest) = layout.manifest(tag)?;
    if let Some(bad) = layers.iter().find(|&&i| i >= manifest.layers.len()) {
        return Err(EncryptError::NoSuchLayer {
            tag: tag.to_string(),
            count: manifest.layers.len(),
            index: *bad,
        });
    }
    for (i, layer) in manifest.layers.iter_mut().enumerate() {
        if !layers.is_empty() && !layers.contains(&i) {
            continue;
        }
        if ocicrypt::is_encrypted_media_type(&layer.media_type) {
            return Err(EncryptError::AlreadyEncrypted {
                index: i,
                tag: tag.to_string(),
            });
        }
        let mut plain = BufReader::with_capacity(1 << 20, layout.open_blob(&layer.digest)?);
        let mut enc =
            LayerEncryptor::new(layout.blob_writer()?, recipients).map_err(EncryptError::Setup)?;
        io::copy(&mut plain, &mut enc)
            .map_err(|source| EncryptError::Encrypting { index: i, source })?;
        let (blob, annotations) = enc.finish().map_err(EncryptError::WrapKey)?;
        let mut encrypted = blob.finish(&ocicrypt::encrypted_media_type(&layer.media_type))?;
        encrypted.annotations = layer.annotations.clone();
        encrypted.annotations.extend(annotations);
        *layer = encrypted;
    }
    Ok(layout.put_manifest(out_tag, &manifest)?)
}
