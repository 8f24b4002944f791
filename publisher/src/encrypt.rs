//! Encrypting an image's layers with ocicrypt (what `skopeo copy --encryption-key` does).

use std::io::{self, BufReader};

use anyhow::{bail, Context, Result};
use ocicrypt::{EncryptConfig, LayerEncryptor};

use crate::layout::{Descriptor, Layout};

/// Encrypts the layers of `tag` selected by `layers` (all when empty) to `recipients` and
/// tags the result `out_tag`. The config (diff_ids) does not change: it describes the
/// plaintext, which is what a consumer authenticates after decrypting.
pub fn encrypt(
    layout: &Layout,
    tag: &str,
    out_tag: &str,
    recipients: &EncryptConfig,
    layers: &[usize],
) -> Result<Descriptor> {
    let (_, mut manifest) = layout.manifest(tag)?;
    if let Some(bad) = layers.iter().find(|&&i| i >= manifest.layers.len()) {
        bail!(
            "tag {tag:?} has {} layers; there is no layer {bad}",
            manifest.layers.len()
        );
    }
    for (i, layer) in manifest.layers.iter_mut().enumerate() {
        if !layers.is_empty() && !layers.contains(&i) {
            continue;
        }
        if ocicrypt::is_encrypted_media_type(&layer.media_type) {
            bail!("layer {i} of {tag:?} is already encrypted");
        }
        let mut plain = BufReader::with_capacity(1 << 20, layout.open_blob(&layer.digest)?);
        let mut enc = LayerEncryptor::new(layout.blob_writer()?, recipients)
            .context("setting up layer encryption")?;
        io::copy(&mut plain, &mut enc).with_context(|| format!("encrypting layer {i}"))?;
        let (blob, annotations) = enc.finish().context("wrapping the layer key")?;
        let mut encrypted = blob.finish(&ocicrypt::encrypted_media_type(&layer.media_type))?;
        encrypted.annotations = layer.annotations.clone();
        encrypted.annotations.extend(annotations);
        *layer = encrypted;
    }
    layout.put_manifest(out_tag, &manifest)
}
