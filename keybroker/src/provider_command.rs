//! `keybroker keyprovider`: the ocicrypt key provider protocol in its command form. One
//! request on stdin, relayed to the running broker's key provider service over its Unix
//! socket, and the reply on stdout. Configured in OCICRYPT_KEYPROVIDER_CONFIG as
//! `{"cmd": {"path": "keybroker", "args": ["--socket", SOCKET, "keyprovider"]}}`.

use std::io::{Read, Write};
use std::path::Path;

use api::keyprovider::key_provider_service_client::KeyProviderServiceClient;
use api::keyprovider::KeyProviderKeyWrapProtocolInput;
use zeroize::Zeroizing;

use crate::admin::{connect, runtime, AdminError};

/// Largest request read from stdin.
const MAX_REQUEST: u64 = 1 << 20;

/// Why the command form failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderCommandError {
    #[error("keyprovider needs --socket (the running broker's Unix socket)")]
    NoSocket,
    #[error("stdin: {0}")]
    Stdin(#[source] std::io::Error),
    #[error("stdout: {0}")]
    Stdout(#[source] std::io::Error),
    #[error("malformed key provider request: {0}")]
    Request(#[source] serde_json::Error),
    #[error(transparent)]
    Broker(#[from] AdminError),
}

/// Whether a request unwraps (else it wraps, and the broker judges the operation).
pub fn is_unwrap(request: &[u8]) -> Result<bool, ProviderCommandError> {
    let op = serde_json::from_slice::<ocicrypt::keyprovider::Request>(request)
        .map_err(ProviderCommandError::Request)?
        .op;
    Ok(op == ocicrypt::keyprovider::OP_UNWRAP)
}

/// Relays one request (the protocol's JSON) to the broker at `socket`; returns its reply.
pub fn relay(socket: &Path, input: &[u8]) -> Result<Zeroizing<Vec<u8>>, ProviderCommandError> {
    let unwrap = is_unwrap(input)?;
    let rt = runtime()?;
    let output = rt.block_on(async {
        let mut client = KeyProviderServiceClient::new(connect(socket).await?);
        let req = KeyProviderKeyWrapProtocolInput {
            key_provider_key_wrap_protocol_input: input.to_vec(),
        };
        let reply = if unwrap {
            client.un_wrap_key(req).await
        } else {
            client.wrap_key(req).await
        };
        reply
            .map(|r| r.into_inner().key_provider_key_wrap_protocol_output)
            .map_err(AdminError::from)
    })?;
    Ok(Zeroizing::new(output))
}

/// The command: stdin to the broker at `socket`, its reply to stdout.
pub fn run(socket: Option<&Path>) -> Result<(), ProviderCommandError> {
    let socket = socket.ok_or(ProviderCommandError::NoSocket)?;
    let mut input = Zeroizing::new(Vec::new());
    std::io::stdin()
        .take(MAX_REQUEST)
        .read_to_end(&mut input)
        .map_err(ProviderCommandError::Stdin)?;
    let output = relay(socket, &input)?;
    std::io::stdout()
        .write_all(&output)
        .map_err(ProviderCommandError::Stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_told_apart_and_garbage_is_refused_before_connecting() {
        assert!(is_unwrap(br#"{"op":"keyunwrap","keyunwrapparams":{}}"#).unwrap());
        assert!(!is_unwrap(br#"{"op":"keywrap","keywrapparams":{}}"#).unwrap());
        let e = relay(Path::new("/nonexistent.sock"), b"not json")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("malformed key provider request: "), "{e}");
        assert_eq!(
            run(None).unwrap_err().to_string(),
            "keyprovider needs --socket (the running broker's Unix socket)"
        );
    }
}
