//! The ocicrypt key provider protocol: a layer's private options wrapped by an external
//! service instead of to a JWE recipient.
//!
//! The messages are the JSON Go ocicrypt (`utils/keyprovider`) exchanges with a provider,
//! either on a command's stdin and stdout or in field 1 of the gRPC `KeyProviderService`
//! messages. Go encodes `[]byte` as standard base64 strings and `nil` as `null`; [`Bytes`]
//! does the same, so either side interoperates with Go tools. The wrapped result becomes the
//! layer annotation `org.opencontainers.image.enc.keys.provider.<name>` (base64 of the
//! provider's bytes; several wrappings comma-separated, as Go writes them).
//!
//! This module has the messages, the provider configuration file
//! (`OCICRYPT_KEYPROVIDER_CONFIG`) and the command form of the client. The gRPC form is
//! served by the key broker; a gRPC client needs a transport this crate does not carry.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::Error;

/// Operation names of the protocol.
pub const OP_WRAP: &str = "keywrap";
pub const OP_UNWRAP: &str = "keyunwrap";

/// Largest reply read from a provider command.
const MAX_REPLY: usize = 1 << 20;

/// Bytes that travel as a standard base64 string (Go's `[]byte`); zeroized on drop because
/// they may be private options.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes(pub Zeroizing<Vec<u8>>);

impl Bytes {
    pub fn new(v: Vec<u8>) -> Self {
        Self(Zeroizing::new(v))
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(self.0.as_slice()))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Zeroizing::new(String::deserialize(d)?);
        STANDARD
            .decode(s.as_bytes())
            .map(Bytes::new)
            .map_err(|e| serde::de::Error::custom(format!("not standard base64: {e}")))
    }
}

/// Provider parameters: provider name -> values (Go `map[string][][]byte`).
pub type Parameters = BTreeMap<String, Vec<Bytes>>;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DecryptParameters {
    #[serde(rename = "Parameters", default, deserialize_with = "null_as_default")]
    pub parameters: Parameters,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EncryptParameters {
    #[serde(rename = "Parameters", default, deserialize_with = "null_as_default")]
    pub parameters: Parameters,
    #[serde(rename = "DecryptConfig", default)]
    pub decrypt_config: DecryptParameters,
}

fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyWrapParams {
    #[serde(default)]
    pub ec: Option<EncryptParameters>,
    #[serde(default)]
    pub optsdata: Option<Bytes>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyUnwrapParams {
    #[serde(default)]
    pub dc: Option<DecryptParameters>,
    #[serde(default)]
    pub annotation: Option<Bytes>,
}

/// A request to a provider.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request {
    pub op: String,
    #[serde(default)]
    pub keywrapparams: KeyWrapParams,
    #[serde(default)]
    pub keyunwrapparams: KeyUnwrapParams,
}

impl Request {
    /// Wrap `optsdata` for the provider `name` with its parameter (Go passes the part after
    /// `provider:<name>:` of the recipient as the one value).
    pub fn wrap(name: &str, param: &[u8], optsdata: &[u8]) -> Self {
        Self {
            op: OP_WRAP.into(),
            keywrapparams: KeyWrapParams {
                ec: Some(EncryptParameters {
                    parameters: BTreeMap::from([(
                        name.to_string(),
                        vec![Bytes::new(param.to_vec())],
                    )]),
                    decrypt_config: DecryptParameters::default(),
                }),
                optsdata: Some(Bytes::new(optsdata.to_vec())),
            },
            keyunwrapparams: KeyUnwrapParams::default(),
        }
    }

    /// Unwrap one annotation (the provider's bytes) with decryption parameters.
    pub fn unwrap(annotation: &[u8], parameters: Parameters) -> Self {
        Self {
            op: OP_UNWRAP.into(),
            keywrapparams: KeyWrapParams::default(),
            keyunwrapparams: KeyUnwrapParams {
                dc: Some(DecryptParameters { parameters }),
                annotation: Some(Bytes::new(annotation.to_vec())),
            },
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyWrapResults {
    #[serde(default)]
    pub annotation: Option<Bytes>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyUnwrapResults {
    #[serde(default)]
    pub optsdata: Option<Bytes>,
}

/// A provider's reply.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keywrapresults: Option<KeyWrapResults>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyunwrapresults: Option<KeyUnwrapResults>,
}

impl Reply {
    pub fn wrapped(annotation: Vec<u8>) -> Self {
        Self {
            keywrapresults: Some(KeyWrapResults {
                annotation: Some(Bytes::new(annotation)),
            }),
            keyunwrapresults: None,
        }
    }

    pub fn unwrapped(optsdata: Zeroizing<Vec<u8>>) -> Self {
        Self {
            keywrapresults: None,
            keyunwrapresults: Some(KeyUnwrapResults {
                optsdata: Some(Bytes(optsdata)),
            }),
        }
    }
}

/// How to reach a provider, from the configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ProviderEntry {
    #[serde(default)]
    pub cmd: Option<CommandForm>,
    #[serde(default)]
    pub grpc: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct CommandForm {
    pub path: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
}

/// The file `OCICRYPT_KEYPROVIDER_CONFIG` names:
/// `{"key-providers": {"<name>": {"cmd": {"path": "...", "args": [...]}} | {"grpc": "..."}}}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ProviderConfig {
    #[serde(rename = "key-providers", default)]
    pub key_providers: BTreeMap<String, ProviderEntry>,
}

impl ProviderConfig {
    pub fn load(path: &Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::Unsupported(format!("key provider config {}: {e}", path.display()))
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Unsupported(format!("key provider config {}: {e}", path.display())))
    }

    /// The configuration `OCICRYPT_KEYPROVIDER_CONFIG` names, if set.
    pub fn from_env() -> Result<Option<Self>, Error> {
        match std::env::var_os("OCICRYPT_KEYPROVIDER_CONFIG") {
            Some(p) => Self::load(Path::new(&p)).map(Some),
            None => Ok(None),
        }
    }

    /// The command of provider `name`.
    pub fn command(&self, name: &str) -> Result<&CommandForm, Error> {
        let entry = self.key_providers.get(name).ok_or_else(|| {
            Error::NoKey(format!(
                "no key provider {name:?} in the key provider config"
            ))
        })?;
        entry.cmd.as_ref().ok_or_else(|| {
            Error::Unsupported(format!(
                "key provider {name:?} is configured only in gRPC form; this client uses the command form"
            ))
        })
    }
}

impl CommandForm {
    /// Runs the provider once: the request on stdin, the reply from stdout.
    pub fn call(&self, request: &Request) -> Result<Reply, Error> {
        let what = self.path.display();
        let input = Zeroizing::new(serde_json::to_vec(request).expect("requests serialize"));
        let mut child = Command::new(&self.path)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::NoKey(format!("key provider {what}: {e}")))?;
        let mut stdin = child.stdin.take().expect("piped");
        let written = stdin.write_all(&input);
        drop(stdin);
        let out = child
            .wait_with_output()
            .map_err(|e| Error::NoKey(format!("key provider {what}: {e}")))?;
        let stdout = Zeroizing::new(out.stdout);
        if !out.status.success() {
            return Err(Error::NoKey(format!(
                "key provider {what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        written.map_err(|e| Error::NoKey(format!("key provider {what}: stdin: {e}")))?;
        if stdout.len() > MAX_REPLY {
            return Err(Error::NoKey(format!(
                "key provider {what}: reply larger than 1 MiB"
            )));
        }
        serde_json::from_slice(&stdout)
            .map_err(|e| Error::NoKey(format!("key provider {what}: malformed reply: {e}")))
    }

    /// Wraps private options; returns the provider's annotation bytes.
    pub fn wrap(&self, name: &str, param: &[u8], optsdata: &[u8]) -> Result<Vec<u8>, Error> {
        let reply = self.call(&Request::wrap(name, param, optsdata))?;
        reply
            .keywrapresults
            .and_then(|r| r.annotation)
            .map(|a| a.0.to_vec())
            .ok_or_else(|| {
                Error::NoKey(format!(
                    "key provider {}: the reply has no wrapped key",
                    self.path.display()
                ))
            })
    }

    /// Unwraps one annotation; returns the private options.
    pub fn unwrap(
        &self,
        annotation: &[u8],
        parameters: Parameters,
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let reply = self.call(&Request::unwrap(annotation, parameters))?;
        reply
            .keyunwrapresults
            .and_then(|r| r.optsdata)
            .map(|o| o.0)
            .ok_or_else(|| {
                Error::NoKey(format!(
                    "key provider {}: the reply has no private options",
                    self.path.display()
                ))
            })
    }
}

/// A layer recipient served by a key provider: `provider:<name>:<param>`.
#[derive(Clone, Debug)]
pub struct ProviderRecipient {
    pub name: String,
    pub param: Vec<u8>,
    pub command: CommandForm,
}

impl ProviderRecipient {
    /// Parses `provider:<name>[:<param>]` against a provider configuration.
    pub fn parse(recipient: &str, config: &ProviderConfig) -> Result<Self, Error> {
        let rest = recipient.strip_prefix("provider:").ok_or_else(|| {
            Error::Unsupported(format!("{recipient:?} is not a provider:<name> recipient"))
        })?;
        let (name, param) = rest.split_once(':').unwrap_or((rest, ""));
        if name.is_empty() {
            return Err(Error::Unsupported(format!(
                "{recipient:?} names no provider"
            )));
        }
        Ok(Self {
            name: name.to_string(),
            param: param.as_bytes().to_vec(),
            command: config.command(name)?.clone(),
        })
    }

    /// The annotation this recipient's wrapping goes into.
    pub fn annotation_name(&self) -> String {
        format!("{}{}", crate::ANNOTATION_KEYS_PROVIDER_PREFIX, self.name)
    }
}

/// The provider wrappings in an annotation value: base64 items separated by commas.
pub fn split_annotation(value: &str) -> Result<Vec<Vec<u8>>, Error> {
    value
        .split(',')
        .enumerate()
        .map(|(i, item)| {
            STANDARD.decode(item.trim()).map_err(|e| {
                Error::MalformedAnnotations(format!(
                    "key provider wrapping #{i} is not standard base64: {e}"
                ))
            })
        })
        .collect()
}

/// Joins wrappings into an annotation value (the inverse of [`split_annotation`]).
pub fn join_annotation(wrappings: &[Vec<u8>]) -> String {
    wrappings
        .iter()
        .map(|w| STANDARD.encode(w))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request Go ocicrypt 1.1 writes for `provider:ipubroker:kek-1`, byte for byte as
    /// seen on a provider's stdin (NOTES-formats).
    const GO_WRAP: &str = r#"{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"ipubroker":["a2VrLTE="]},"DecryptConfig":{"Parameters":{}}},"optsdata":"eyJzeW1rZXkiOiJ4In0="},"keyunwrapparams":{"dc":null,"annotation":null}}"#;
    const GO_UNWRAP: &str = r#"{"op":"keyunwrap","keywrapparams":{"ec":null,"optsdata":null},"keyunwrapparams":{"dc":{"Parameters":{"ipubroker":["c2Vzc2lvbg=="]}},"annotation":"d3JhcHBlZA=="}}"#;

    #[test]
    fn reads_go_requests() {
        let r: Request = serde_json::from_str(GO_WRAP).unwrap();
        assert_eq!(
            r,
            Request::wrap("ipubroker", b"kek-1", br#"{"symkey":"x"}"#)
        );
        let r: Request = serde_json::from_str(GO_UNWRAP).unwrap();
        assert_eq!(
            r,
            Request::unwrap(
                b"wrapped",
                BTreeMap::from([("ipubroker".into(), vec![Bytes::new(b"session".to_vec())])])
            )
        );
    }

    #[test]
    fn writes_bytes_as_base64_strings_not_number_arrays() {
        let json = serde_json::to_string(&Reply::wrapped(b"wrapped".to_vec())).unwrap();
        assert_eq!(json, r#"{"keywrapresults":{"annotation":"d3JhcHBlZA=="}}"#);
        let json = serde_json::to_string(&Request::wrap("p", b"k", b"o")).unwrap();
        assert!(json.contains(r#""optsdata":"bw==""#), "{json}");
        assert!(json.contains(r#""Parameters":{"p":["aw=="]}"#), "{json}");
    }

    #[test]
    fn go_replies_with_nulls_parse() {
        let r: Reply = serde_json::from_str(
            r#"{"keywrapresults":{"annotation":null},"keyunwrapresults":{"optsdata":"b3B0cw=="}}"#,
        )
        .unwrap();
        assert_eq!(r.keywrapresults.unwrap().annotation, None);
        assert_eq!(
            r.keyunwrapresults.unwrap().optsdata.unwrap().as_slice(),
            b"opts"
        );
    }

    #[test]
    fn bad_base64_is_refused() {
        let e = serde_json::from_str::<Reply>(r#"{"keyunwrapresults":{"optsdata":"%%%"}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("base64"), "{e}");
        assert!(split_annotation("YQ==,%%").is_err());
    }

    #[test]
    fn annotations_round_trip() {
        let w = vec![b"one".to_vec(), b"two".to_vec()];
        assert_eq!(split_annotation(&join_annotation(&w)).unwrap(), w);
    }

    #[test]
    fn config_and_recipients() {
        let c: ProviderConfig = serde_json::from_str(
            r#"{"key-providers":{"ipubroker":{"cmd":{"path":"/usr/bin/keybroker","args":["keyprovider"]}},"remote":{"grpc":"unix:///run/kb.sock"}}}"#,
        )
        .unwrap();
        let r = ProviderRecipient::parse("provider:ipubroker:kek-1", &c).unwrap();
        assert_eq!(
            (r.name.as_str(), r.param.as_slice()),
            ("ipubroker", &b"kek-1"[..])
        );
        assert_eq!(
            r.annotation_name(),
            "org.opencontainers.image.enc.keys.provider.ipubroker"
        );
        let e = ProviderRecipient::parse("provider:remote:x", &c).unwrap_err();
        assert!(e.to_string().contains("gRPC form"), "{e}");
        let e = ProviderRecipient::parse("provider:nope:x", &c).unwrap_err();
        assert!(e.to_string().contains("no key provider \"nope\""), "{e}");
    }

    #[test]
    fn debug_hides_bytes() {
        let b = Bytes::new(b"secret key".to_vec());
        assert_eq!(format!("{b:?}"), "Bytes(10 bytes)");
    }
}
