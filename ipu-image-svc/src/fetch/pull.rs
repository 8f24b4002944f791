//! Pulling a verified image's layers into the blob cache.

use std::path::PathBuf;

use super::{BlobCache, Descriptor, FetchError, ImageSource};
use crate::progress::Progress;

/// Layers fetched at once.
const PARALLEL_FETCHES: usize = 4;

/// Fetches `layers` from `source` into `cache`, each checked against its descriptor's size
/// and digest while it streams, a few at a time: a registry's latency is per request, and
/// the layers are independent until they are applied. Returns their paths in order.
pub fn pull_layers(
    source: &dyn ImageSource,
    cache: &BlobCache,
    layers: &[Descriptor],
    progress: &dyn Progress,
) -> Result<Vec<PathBuf>, FetchError> {
    let mut paths = Vec::with_capacity(layers.len());
    for (batch, chunk) in layers.chunks(PARALLEL_FETCHES).enumerate() {
        let fetched: Vec<Result<PathBuf, FetchError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .enumerate()
                .map(|(j, layer)| {
                    let i = batch * PARALLEL_FETCHES + j;
                    let label = format!("layer {}/{}", i + 1, layers.len());
                    progress.stage(&format!("pulling {label} ({})", layer.digest));
                    scope.spawn(move || {
                        cache.fetch(source, layer, &|done, total| {
                            progress.bytes(&label, done, total)
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a fetch thread panicked"))
                .collect()
        });
        progress.finish_bytes();
        for path in fetched {
            let path = path?;
            progress.pulled(paths.len(), &path);
            paths.push(path);
        }
    }
    Ok(paths)
}
