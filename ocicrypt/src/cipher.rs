//! The AES_256_CTR_HMAC_SHA256 layer cipher as streams.
//!
//! AES-256-CTR with a 128-bit big-endian counter starting at the 16-byte nonce; HMAC-SHA256
//! keyed with the same symmetric key over the whole ciphertext. Decryption also hashes the
//! plaintext, which must match the digest in the private options, unless the caller verifies
//! the plaintext itself ([`PlaintextCheck`]).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use aes::cipher::{KeyIvInit, StreamCipher};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::options::{PrivateLayerOptions, PublicLayerOptions, CIPHER_NAME};
use crate::wipe::{scrub_stack, scrub_stack_at_end, HeapHome, Placed, StateHome, WipedHmac};
use crate::{jwe, Annotations, DecryptConfig, EncryptConfig, Error};

pub(crate) type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

/// Chunk size: small enough that a chunk stays in L2 between the CTR pass and the SHA-256
/// passes over it, large enough that handing chunks to the HMAC thread costs little. Each
/// hand-off wakes a thread: on a 2-core VM the HMAC thread reached 0.93 of one SHA-256 pass
/// with 256 KiB chunks, 0.95 with 512 KiB, 0.98 with 1 MiB (64 KiB: 0.86). 1 MiB buffers
/// raised `image unpack`'s peak memory by 1.3 MiB, to that of skopeo, which it must stay
/// under (issue 20); 512 KiB raised it by 0.4 MiB.
const CHUNK: usize = 512 * 1024;

/// Proof that a layer's ciphertext HMAC, and the plaintext digest unless the caller took that
/// check on ([`PlaintextCheck::CallerVerifies`]), were checked over the whole stream. Only
/// [`LayerDecryptor::finish`] and [`VerifiedDecryptor::finish`](crate::VerifiedDecryptor::finish)
/// make one; callers require it before publishing anything built from the plaintext.
#[derive(Debug)]
pub struct AuthenticatedLayer {
    plaintext_digest: Option<String>,
    plaintext_size: u64,
}

impl AuthenticatedLayer {
    pub(crate) fn new(plaintext_digest: Option<String>, plaintext_size: u64) -> Self {
        Self {
            plaintext_digest,
            plaintext_size,
        }
    }

    /// `sha256:<hex>` of the plaintext (the layer's digest before encryption); `None` when the
    /// decryptor did not hash it ([`PlaintextCheck::CallerVerifies`]).
    pub fn plaintext_digest(&self) -> Option<&str> {
        self.plaintext_digest.as_deref()
    }

    pub fn plaintext_size(&self) -> u64 {
        self.plaintext_size
    }
}

/// Where the HMAC over the ciphertext is computed.
///
/// A SHA-256 pass is the slowest part of decryption (AES-CTR with AES-NI costs a third of
/// one). With a second core, the HMAC runs on its own thread while the caller's thread
/// decrypts (and hashes the plaintext, under [`PlaintextCheck::DeclaredDigest`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HmacMode {
    /// Everything on the reading thread.
    Inline,
    /// The HMAC on a helper thread fed with ciphertext buffers.
    Thread,
}

impl HmacMode {
    /// `Thread` when the machine has more than one CPU available to us.
    pub fn auto() -> Self {
        match std::thread::available_parallelism() {
            Ok(n) if n.get() > 1 => HmacMode::Thread,
            _ => HmacMode::Inline,
        }
    }
}

/// What [`LayerDecryptor::finish`] checks of the plaintext, besides the HMAC over the
/// ciphertext that it always checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaintextCheck {
    /// Hash the plaintext and compare it with the digest the private options declare: what a
    /// caller that publishes the decrypted blob under that digest needs.
    DeclaredDigest,
    /// Do not hash the plaintext: the caller checks what it builds from it against something
    /// signed before using it (an unpacker, the decompressed layer against the config's
    /// diff_id). Saves one SHA-256 pass per byte, which on two cores is the difference
    /// between decrypting at the speed of one SHA-256 pass and at three quarters of it. The
    /// HMAC still authenticates every byte of ciphertext.
    CallerVerifies,
}

/// How a [`LayerDecryptor`] works: where the HMAC runs, and what it checks of the plaintext.
/// An [`HmacMode`] alone converts to one that checks the declared digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecryptMode {
    pub hmac: HmacMode,
    pub plaintext: PlaintextCheck,
}

impl DecryptMode {
    /// [`HmacMode::auto`], checking the declared digest.
    pub fn auto() -> Self {
        HmacMode::auto().into()
    }

    /// [`HmacMode::auto`], for a caller that verifies the plaintext itself.
    pub fn caller_verifies() -> Self {
        Self {
            hmac: HmacMode::auto(),
            plaintext: PlaintextCheck::CallerVerifies,
        }
    }
}

impl From<HmacMode> for DecryptMode {
    fn from(hmac: HmacMode) -> Self {
        Self {
            hmac,
            plaintext: PlaintextCheck::DeclaredDigest,
        }
    }
}

/// Ciphertext buffers in flight to the HMAC thread: one being hashed, one queued, one being
/// filled and decrypted.
const MAC_BUFFERS: usize = 3;

/// The HMAC computed on a helper thread. Buffers go to the thread full of ciphertext and
/// come back empty; at most [`MAC_BUFFERS`] exist.
struct MacThread {
    to_worker: Option<std::sync::mpsc::SyncSender<(Vec<u8>, usize)>>,
    from_worker: std::sync::mpsc::Receiver<Vec<u8>>,
    worker: Option<std::thread::JoinHandle<[u8; 32]>>,
    allocated: usize,
    /// A buffer that came back unused (end of stream or a read error).
    spare: Option<Vec<u8>>,
    /// Ciphertext read ahead of the caller, handed to the thread once all of it is decrypted.
    pending: Option<ReadAhead>,
    /// A read error that came after some ciphertext: returned once that is decrypted.
    deferred: Option<io::Error>,
}

/// A buffer of ciphertext, `filled` bytes, of which the first `taken` were decrypted.
struct ReadAhead {
    buf: Vec<u8>,
    filled: usize,
    taken: usize,
}

impl MacThread {
    /// `mac` is moved to the thread as a pointer: the state stays in its home.
    fn start(mut mac: Placed<WipedHmac>) -> io::Result<Self> {
        let (to_worker, work) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(MAC_BUFFERS);
        let (give_back, from_worker) = std::sync::mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("ocicrypt-hmac".into())
            .spawn(move || {
                for (buf, n) in work {
                    mac.update(&buf[..n]);
                    // The reader may be gone (dropped early); nothing to do then.
                    let _ = give_back.send(buf);
                }
                mac.finalize_and_wipe()
            })?;
        Ok(Self {
            to_worker: Some(to_worker),
            from_worker,
            worker: Some(worker),
            allocated: 0,
            spare: None,
            pending: None,
            deferred: None,
        })
    }

    fn buffer(&mut self) -> io::Result<Vec<u8>> {
        if let Some(buf) = self.spare.take() {
            return Ok(buf);
        }
        if let Ok(buf) = self.from_worker.try_recv() {
            return Ok(buf);
        }
        if self.allocated < MAC_BUFFERS {
            self.allocated += 1;
            return Ok(vec![0u8; CHUNK]);
        }
        self.from_worker
            .recv()
            .map_err(|_| io::Error::other("HMAC thread stopped"))
    }

    /// Reads a whole chunk of ciphertext ahead (however little the caller asks for: a
    /// hand-off per chunk, not per read) unless some is still pending. `false` at the end.
    fn read_ahead(&mut self, inner: &mut impl Read) -> io::Result<bool> {
        if self.pending.is_some() {
            return Ok(true);
        }
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let mut buf = self.buffer()?;
        let mut filled = 0;
        while filled < CHUNK {
            match inner.read(&mut buf[filled..CHUNK]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if filled == 0 => {
                    self.spare = Some(buf);
                    return Err(e);
                }
                Err(e) => {
                    self.deferred = Some(e);
                    break;
                }
            }
        }
        if filled == 0 {
            self.spare = Some(buf);
            return Ok(false);
        }
        self.pending = Some(ReadAhead {
            buf,
            filled,
            taken: 0,
        });
        Ok(true)
    }

    /// Decrypts the next pending ciphertext into `out`; a chunk all decrypted goes to the
    /// HMAC thread.
    fn decrypt_into(&mut self, ctr: &mut Aes256Ctr, out: &mut [u8]) -> io::Result<usize> {
        let ahead = self.pending.as_mut().expect("read ahead");
        let n = out.len().min(ahead.filled - ahead.taken);
        ctr.apply_keystream_b2b(&ahead.buf[ahead.taken..ahead.taken + n], &mut out[..n])
            .expect("same lengths");
        ahead.taken += n;
        if ahead.taken == ahead.filled {
            let ahead = self.pending.take().expect("read ahead");
            self.send(ahead.buf, ahead.filled)?;
        }
        Ok(n)
    }

    fn send(&mut self, buf: Vec<u8>, n: usize) -> io::Result<()> {
        self.to_worker
            .as_ref()
            .expect("not finished")
            .send((buf, n))
            .map_err(|_| io::Error::other("HMAC thread stopped"))
    }

    fn finish(&mut self) -> io::Result<[u8; 32]> {
        drop(self.to_worker.take());
        self.worker
            .take()
            .expect("finished once")
            .join()
            .map_err(|_| io::Error::other("HMAC thread panicked"))
    }
}

enum MacState {
    Inline(Placed<WipedHmac>),
    Thread(MacThread),
}

/// Streaming decryption. `Read` yields plaintext that is **not yet authenticated**.
///
/// The AES-CTR and HMAC states (as good as the layer key) live where the [`StateHome`] put
/// them (the heap unless [`with_options_in`](Self::with_options_in) names another home), are
/// only pointed to from here, and are wiped when the decryptor drops.
pub struct LayerDecryptor<R> {
    inner: R,
    ctr: Placed<Aes256Ctr>,
    mac: MacState,
    /// `None` under [`PlaintextCheck::CallerVerifies`].
    plain_hash: Option<Sha256>,
    expected_hmac: Vec<u8>,
    expected_digest: String,
    plaintext_size: u64,
}

/// Starts decrypting a layer: unwraps the private options from the layer's annotations with
/// the configured keys and checks the public options name our cipher.
pub fn decrypt_layer<R: Read>(
    ciphertext: R,
    annotations: &Annotations,
    dc: &DecryptConfig,
) -> Result<LayerDecryptor<R>, Error> {
    decrypt_layer_with(ciphertext, annotations, dc, DecryptMode::auto())
}

/// [`decrypt_layer`] with an explicit [`DecryptMode`] (it uses [`DecryptMode::auto`]).
pub fn decrypt_layer_with<R: Read>(
    ciphertext: R,
    annotations: &Annotations,
    dc: &DecryptConfig,
    mode: impl Into<DecryptMode>,
) -> Result<LayerDecryptor<R>, Error> {
    crate::log_hardware_once();
    let pubopts = PublicLayerOptions::from_annotations(annotations)?;
    let privopts = unwrap_private_options(annotations, dc)?;
    LayerDecryptor::with_options_and_mode(ciphertext, &pubopts, &privopts, mode)
}

/// The private options (layer key, nonce, plaintext digest) unwrapped from a layer's
/// `keys.jwe` annotation with the configured keys.
pub fn unwrap_private_options(
    annotations: &Annotations,
    dc: &DecryptConfig,
) -> Result<PrivateLayerOptions, Error> {
    let jwe_annotation = annotations.get(crate::ANNOTATION_KEYS_JWE).ok_or_else(|| {
        let providers: Vec<&str> = annotations
            .keys()
            .filter_map(|k| k.strip_prefix(crate::ANNOTATION_KEYS_PROVIDER_PREFIX))
            .collect();
        if providers.is_empty() {
            Error::MalformedAnnotations(format!(
                "layer has no {} annotation (no wrapped key at all)",
                crate::ANNOTATION_KEYS_JWE
            ))
        } else {
            Error::Unsupported(format!(
                "layer keys are wrapped only by key provider(s) {}: obtain them from that provider (the key broker)",
                providers.join(", ")
            ))
        }
    })?;
    let opts_json = jwe::unwrap(jwe_annotation, dc.keys())?;
    PrivateLayerOptions::from_json(&opts_json)
}

impl<R: Read> LayerDecryptor<R> {
    /// Starts decrypting with options obtained elsewhere (e.g. from a key broker).
    pub fn with_options(
        inner: R,
        pubopts: &PublicLayerOptions,
        privopts: &PrivateLayerOptions,
    ) -> Result<Self, Error> {
        Self::with_options_and_mode(inner, pubopts, privopts, DecryptMode::auto())
    }

    /// [`with_options`](Self::with_options) with an explicit [`DecryptMode`].
    pub fn with_options_and_mode(
        inner: R,
        pubopts: &PublicLayerOptions,
        privopts: &PrivateLayerOptions,
        mode: impl Into<DecryptMode>,
    ) -> Result<Self, Error> {
        Self::with_options_in(inner, pubopts, privopts, mode, &HeapHome)
    }

    /// [`with_options_and_mode`](Self::with_options_and_mode) with the key-dependent state
    /// (AES-CTR round keys, HMAC state) placed by `home`, e.g. in the caller's secret memory.
    pub fn with_options_in(
        inner: R,
        pubopts: &PublicLayerOptions,
        privopts: &PrivateLayerOptions,
        mode: impl Into<DecryptMode>,
        home: &impl StateHome,
    ) -> Result<Self, Error> {
        let mode = mode.into();
        if pubopts.cipher != CIPHER_NAME {
            return Err(Error::Unsupported(format!(
                "layer cipher {:?} (only {CIPHER_NAME})",
                pubopts.cipher
            )));
        }
        let ctr = home
            .place(|| Aes256Ctr::new(privopts.symkey().into(), privopts.nonce().into()))
            .map_err(Error::Io)?;
        let mac = home
            .place(|| WipedHmac::new(privopts.symkey()))
            .map_err(Error::Io)?;
        // The key setup's temporaries (key bytes, round keys) are below us on the stack.
        scrub_stack();
        let mac = match mode.hmac {
            HmacMode::Inline => MacState::Inline(mac),
            HmacMode::Thread => MacState::Thread(MacThread::start(mac).map_err(Error::Io)?),
        };
        let dec = Self {
            inner,
            ctr,
            mac,
            plain_hash: match mode.plaintext {
                PlaintextCheck::DeclaredDigest => Some(Sha256::new()),
                PlaintextCheck::CallerVerifies => None,
            },
            expected_hmac: pubopts.hmac.clone(),
            expected_digest: privopts.digest().to_string(),
            plaintext_size: 0,
        };
        Ok(dec)
    }

    /// Reads the rest of the ciphertext, then checks the HMAC over all of it and the plaintext
    /// digest (unless the caller verifies the plaintext, [`PlaintextCheck::CallerVerifies`]).
    /// Anything built from the plaintext may be published only after this succeeds.
    pub fn finish(self) -> Result<AuthenticatedLayer, Error> {
        match self.finish_allowing_stale_digest()? {
            (layer, None) => Ok(layer),
            (layer, Some(stale)) => Err(Error::Integrity(format!(
                "decrypted layer digest {} does not match {} from the private options",
                layer.plaintext_digest.unwrap_or_default(),
                stale.declared
            ))),
        }
    }

    /// Like [`finish`](Self::finish), but a plaintext digest that differs from the private
    /// options is reported instead of refused; the HMAC must still match.
    ///
    /// Go ocicrypt callers that recompress while encrypting (skopeo with
    /// `--dest-compress-format`) record the digest of the layer *before* recompression, so the
    /// declared digest can be stale on genuine images. A caller using this must verify the
    /// plaintext another way before publishing, e.g. the signed config's diff_id.
    pub fn finish_allowing_stale_digest(
        mut self,
    ) -> Result<(AuthenticatedLayer, Option<StaleDigest>), Error> {
        // Usually nothing is left; the HMAC's chunks do not depend on this buffer's size.
        let mut sink = vec![0u8; 64 * 1024];
        loop {
            let n = self.read(&mut sink).map_err(Error::Io)?;
            if n == 0 {
                break;
            }
        }
        sink.zeroize();
        let tag: [u8; 32] = match &mut self.mac {
            MacState::Inline(mac) => mac.finalize_and_wipe(),
            MacState::Thread(t) => t.finish().map_err(Error::Io)?,
        };
        if !bool::from(tag.as_slice().ct_eq(&self.expected_hmac)) {
            return Err(Error::Integrity(
                "layer HMAC does not match: ciphertext modified or truncated".into(),
            ));
        }
        let Some(hash) = self.plain_hash.take() else {
            return Ok((AuthenticatedLayer::new(None, self.plaintext_size), None));
        };
        let digest = format!("sha256:{}", hex(&hash.finalize()));
        let stale = (digest != self.expected_digest).then(|| StaleDigest {
            declared: std::mem::take(&mut self.expected_digest),
        });
        Ok((
            AuthenticatedLayer::new(Some(digest), self.plaintext_size),
            stale,
        ))
    }
}

impl<R> Drop for LayerDecryptor<R> {
    /// The states wipe themselves (their home's drop); the stack the `read` calls used to
    /// generate keystream is overwritten here.
    fn drop(&mut self) {
        scrub_stack_at_end();
    }
}

/// The digest the private options declared, when it differs from the decrypted content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleDigest {
    pub declared: String,
}

impl<R: Read> Read for LayerDecryptor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = match &mut self.mac {
            MacState::Inline(mac) => {
                let len = buf.len().min(CHUNK);
                let n = self.inner.read(&mut buf[..len])?;
                mac.update(&buf[..n]);
                self.ctr.apply_keystream(&mut buf[..n]);
                n
            }
            MacState::Thread(t) => {
                // Ciphertext goes into a buffer that is then handed to the HMAC thread; the
                // plaintext is decrypted from it straight into the caller's buffer.
                if t.read_ahead(&mut self.inner)? {
                    t.decrypt_into(&mut self.ctr, buf)?
                } else {
                    0
                }
            }
        };
        if let Some(hash) = &mut self.plain_hash {
            hash.update(&buf[..n]);
        }
        self.plaintext_size += n as u64;
        Ok(n)
    }
}

/// Streaming encryption: plaintext written in, ciphertext written to `W`.
pub struct LayerEncryptor<W: Write> {
    out: W,
    ctr: Placed<Aes256Ctr>,
    mac: Placed<WipedHmac>,
    plain_hash: Sha256,
    /// Behind a pointer, like the cipher state: moving the encryptor copies no key.
    symkey: Box<Zeroizing<[u8; 32]>>,
    nonce: [u8; 16],
    recipients: EncryptConfig,
    buf: Vec<u8>,
}

impl<W: Write> LayerEncryptor<W> {
    pub fn new(out: W, ec: &EncryptConfig) -> Result<Self, Error> {
        crate::log_hardware_once();
        if ec.recipients().is_empty() && ec.providers().is_empty() {
            return Err(Error::NoKey(
                "no recipients to encrypt the layer key to".into(),
            ));
        }
        let mut symkey = Box::new(Zeroizing::new([0u8; 32]));
        OsRng.fill_bytes(symkey.as_mut_slice());
        let mut nonce = [0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let ctr = HeapHome
            .place(|| {
                let key: &[u8; 32] = &symkey;
                Aes256Ctr::new(key.into(), (&nonce).into())
            })
            .map_err(Error::Io)?;
        let mac = HeapHome
            .place(|| WipedHmac::new(symkey.as_slice()))
            .map_err(Error::Io)?;
        scrub_stack();
        Ok(Self {
            out,
            ctr,
            mac,
            plain_hash: Sha256::new(),
            symkey,
            nonce,
            recipients: ec.clone(),
            buf: Vec::with_capacity(CHUNK),
        })
    }

    /// Flushes and returns the writer and the layer annotations (`keys.jwe` and/or
    /// `keys.provider.<name>`, `pubopts`).
    pub fn finish(mut self) -> Result<(W, Annotations), Error> {
        self.out.flush().map_err(Error::Io)?;
        let digest = format!("sha256:{}", hex(&self.plain_hash.finalize()));
        let hmac = self.mac.finalize_and_wipe().to_vec();
        let privopts = PrivateLayerOptions::new(**self.symkey, self.nonce, digest);
        let optsdata = privopts.to_json();
        let mut annotations = Annotations::new();
        if !self.recipients.recipients().is_empty() {
            let wrapped = jwe::wrap(&optsdata, self.recipients.recipients())?;
            annotations.insert(crate::ANNOTATION_KEYS_JWE.to_string(), wrapped);
        }
        let mut by_provider: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for p in self.recipients.providers() {
            let wrapped = p.command.wrap(&p.name, &p.param, &optsdata)?;
            by_provider
                .entry(p.annotation_name())
                .or_default()
                .push(wrapped);
        }
        for (name, wrappings) in by_provider {
            annotations.insert(name, crate::keyprovider::join_annotation(&wrappings));
        }
        let pubopts = PublicLayerOptions {
            cipher: CIPHER_NAME.to_string(),
            hmac,
        };
        annotations.insert(
            crate::ANNOTATION_PUBOPTS.to_string(),
            pubopts.to_annotation(),
        );
        self.buf.zeroize();
        Ok((self.out, annotations))
    }
}

impl<W: Write> Write for LayerEncryptor<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK);
        let data = &data[..n];
        self.plain_hash.update(data);
        self.buf.clear();
        self.buf.extend_from_slice(data);
        self.ctr.apply_keystream(&mut self.buf);
        self.mac.update(&self.buf);
        self.out.write_all(&self.buf)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}
