//! What the administrative commands print: key and IPU listings as text or JSON, and the
//! one-line confirmations. Each returns the text to print, newline-terminated.

use api::keybroker::{IpuInfo, KeyInfo};

fn time(secs: u64) -> String {
    audit::event::format_time(secs * 1_000_000_000)
}

/// `keys list --json`.
pub fn keys_json(keys: &[KeyInfo]) -> String {
    let v: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| {
            serde_json::json!({
                "id": k.id, "version": k.version, "algorithm": k.algorithm,
                "public_pem": k.public_pem, "created": k.created, "revoked": k.revoked,
            })
        })
        .collect();
    format!(
        "{}\n",
        serde_json::to_string_pretty(&v).expect("serializes")
    )
}

/// `keys list`: one line per version.
pub fn keys_text(keys: &[KeyInfo]) -> String {
    keys.iter()
        .map(|k| {
            format!(
                "{:<32} v{:<4} {:<10} {} {}\n",
                k.id,
                k.version,
                k.algorithm,
                time(k.created),
                if k.revoked { "REVOKED" } else { "active" }
            )
        })
        .collect()
}

/// The state of an enrollment, as `ipus list` shows it.
pub fn ipu_state(e: &IpuInfo) -> &'static str {
    match (e.revoked, e.pinned, e.activated) {
        (true, _, _) => "REVOKED",
        (false, true, true) => "active, pinned to its EK",
        (false, true, false) => "awaiting activation",
        (false, false, _) => "active, not pinned",
    }
}

/// `ipus list --json`.
pub fn ipus_json(ipus: &[IpuInfo]) -> String {
    let v: Vec<serde_json::Value> = ipus
        .iter()
        .map(|e| {
            serde_json::json!({
                "ipu_id": e.ipu_id, "ipu_class": e.ipu_class,
                "ak_public": hex::encode(&e.ak_public), "enrolled": e.enrolled, "revoked": e.revoked,
                "pinned": e.pinned, "activated": e.activated,
            })
        })
        .collect();
    format!(
        "{}\n",
        serde_json::to_string_pretty(&v).expect("serializes")
    )
}

/// `ipus list`: one line per IPU.
pub fn ipus_text(ipus: &[IpuInfo]) -> String {
    ipus.iter()
        .map(|e| {
            format!(
                "{:<24} {:<16} {} {}\n",
                e.ipu_id,
                e.ipu_class,
                time(e.enrolled),
                ipu_state(e)
            )
        })
        .collect()
}

/// `ipus enroll`'s confirmation: the IPU, its class and the start of its AK.
pub fn enrolled(e: &IpuInfo) -> String {
    format!(
        "{} enrolled in class {} (AK {})\n",
        e.ipu_id,
        e.ipu_class,
        hex::encode(&e.ak_public[..9])
    )
}

/// `keys rotate`'s note on stderr (the public key goes to stdout).
pub fn rotated(k: &KeyInfo) -> String {
    format!(
        "keybroker: {} version {} ({})\n",
        k.id, k.version, k.algorithm
    )
}

/// `policy load`'s confirmation.
pub fn policy_loaded(version: u64, signer: &str) -> String {
    format!("policy bundle version {version} signed by {signer} is running\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipu(revoked: bool, pinned: bool, activated: bool) -> IpuInfo {
        IpuInfo {
            ipu_id: "ipu-1".into(),
            ipu_class: "gen2".into(),
            ak_public: vec![4; 65],
            enrolled: 0,
            revoked,
            pinned,
            activated,
        }
    }

    #[test]
    fn ipu_states_and_lines() {
        assert_eq!(ipu_state(&ipu(true, true, true)), "REVOKED");
        assert_eq!(
            ipu_state(&ipu(false, true, true)),
            "active, pinned to its EK"
        );
        assert_eq!(ipu_state(&ipu(false, true, false)), "awaiting activation");
        assert_eq!(ipu_state(&ipu(false, false, false)), "active, not pinned");
        let text = ipus_text(&[ipu(false, true, false)]);
        assert!(
            text.starts_with("ipu-1                    gen2             "),
            "{text}"
        );
        assert!(text.ends_with(" awaiting activation\n"), "{text}");
        assert_eq!(
            enrolled(&ipu(false, false, false)),
            "ipu-1 enrolled in class gen2 (AK 040404040404040404)\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&ipus_json(&[ipu(false, true, true)])).unwrap();
        assert_eq!(json[0]["ak_public"], hex::encode([4u8; 65]));
        assert_eq!(json[0]["activated"], true);
    }

    #[test]
    fn key_lines_and_json() {
        let k = KeyInfo {
            id: "acme".into(),
            version: 2,
            algorithm: "RSA-2048".into(),
            public_pem: "PEM".into(),
            created: 0,
            revoked: true,
        };
        let text = keys_text(std::slice::from_ref(&k));
        assert!(
            text.starts_with(&format!("{:<32} v2    RSA-2048   ", "acme")),
            "{text}"
        );
        assert!(text.ends_with(" REVOKED\n"), "{text}");
        let json: serde_json::Value =
            serde_json::from_str(&keys_json(std::slice::from_ref(&k))).unwrap();
        assert_eq!(json[0]["public_pem"], "PEM");
        assert_eq!(rotated(&k), "keybroker: acme version 2 (RSA-2048)\n");
        assert_eq!(
            policy_loaded(3, "signer"),
            "policy bundle version 3 signed by signer is running\n"
        );
    }
}
