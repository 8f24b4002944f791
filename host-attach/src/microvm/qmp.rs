//! A QMP client (QEMU's JSON control protocol, one object per line) over the monitor socket
//! QEMU connects to at start: `qmp_capabilities`, commands and their replies, and the
//! asynchronous events (`DEVICE_DELETED`) that arrive between them.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP: {0}")]
    Io(#[from] io::Error),
    #[error("QMP: QEMU closed its monitor")]
    Closed,
    #[error("QMP: not a QMP message: {0}")]
    Malformed(String),
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP: no {what} within {after:?}")]
    Timeout { what: String, after: Duration },
}

/// One asynchronous event.
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events read while waiting for a command's reply.
    events: VecDeque<QmpEvent>,
}

/// How long a command's reply may take (device_add with a vhost-user back-end negotiates
/// with the IPU first).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

enum Message {
    Reply(Result<Value, (String, String)>),
    Event(QmpEvent),
}

impl Qmp {
    /// Reads QEMU's greeting and enters command mode.
    pub fn handshake(stream: UnixStream) -> Result<Self, QmpError> {
        let writer = stream.try_clone()?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
        };
        let greeting = qmp.read_value(Instant::now() + REPLY_TIMEOUT, "greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Malformed(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_value(&mut self, deadline: Instant, what: &str) -> Result<Value, QmpError> {
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            return Err(QmpError::Timeout {
                what: what.to_string(),
                after: REPLY_TIMEOUT,
            });
        }
        self.reader.get_ref().set_read_timeout(Some(left))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(QmpError::Closed),
            Ok(_) => serde_json::from_str(&line).map_err(|_| QmpError::Malformed(line)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(QmpError::Timeout {
                    what: what.to_string(),
                    after: left,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Message, QmpError> {
        let value = self.read_value(deadline, what)?;
        if let Some(name) = value.get("event").and_then(Value::as_str) {
            return Ok(Message::Event(QmpEvent {
                name: name.to_string(),
                data: value.get("data").cloned().unwrap_or(Value::Null),
            }));
        }
        if let Some(ret) = value.get("return") {
            return Ok(Message::Reply(Ok(ret.clone())));
        }
        if let Some(error) = value.get("error") {
            let text = |k: &str| {
                error
                    .get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            return Ok(Message::Reply(Err((text("class"), text("desc")))));
        }
        Err(QmpError::Malformed(value.to_string()))
    }

    /// Runs `command` with `arguments`; its return value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut line = json!({"execute": command, "arguments": arguments}).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            match self.read_message(deadline, &format!("reply to {command}"))? {
                Message::Event(e) => self.events.push_back(e),
                Message::Reply(Ok(v)) => return Ok(v),
                Message::Reply(Err((class, desc))) => {
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        class,
                        desc,
                    })
                }
            }
        }
    }

    /// Waits until `timeout` for an event that `wanted` accepts (events already read
    /// included); the others are kept.
    pub fn wait_event(
        &mut self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&QmpEvent) -> bool,
    ) -> Result<QmpEvent, QmpError> {
        if let Some(i) = self.events.iter().position(&wanted) {
            return Ok(self.events.remove(i).expect("found"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_message(deadline, what) {
                Ok(Message::Event(e)) if wanted(&e) => return Ok(e),
                Ok(Message::Event(e)) => self.events.push_back(e),
                Ok(Message::Reply(_)) => {}
                Err(QmpError::Timeout { what, .. }) => {
                    return Err(QmpError::Timeout {
                        what,
                        after: timeout,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake QEMU on the other end of a socket pair, answering from a script.
    fn qemu(script: Vec<(&'static str, Vec<&'static str>)>) -> (Qmp, std::thread::JoinHandle<()>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut w = theirs.try_clone().unwrap();
            let mut r = BufReader::new(theirs);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            for (expected, answers) in script {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                let v: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(v["execute"], expected, "{line}");
                for a in answers {
                    w.write_all(a.as_bytes()).unwrap();
                    w.write_all(b"\n").unwrap();
                }
            }
            // Past the script, the next command (or our end closing) closes the monitor.
            let mut line = String::new();
            let _ = r.read_line(&mut line);
        });
        let qmp = Qmp::handshake(ours).unwrap();
        (qmp, peer)
    }

    #[test]
    fn replies_errors_and_events_between_them() {
        let (mut qmp, peer) = qemu(vec![
            ("qmp_capabilities", vec![r#"{"return": {}}"#]),
            (
                "device_del",
                vec![
                    r#"{"event": "ACPI_DEVICE_OST", "data": {}}"#,
                    r#"{"return": {}}"#,
                    r#"{"event": "DEVICE_DELETED", "data": {"device": "fn0"}}"#,
                ],
            ),
            (
                "chardev-remove",
                vec![r#"{"error": {"class": "GenericError", "desc": "Chardev 'x' not found"}}"#],
            ),
        ]);
        assert_eq!(
            qmp.execute("device_del", json!({"id": "fn0"})).unwrap(),
            json!({})
        );
        let e = qmp
            .wait_event("DEVICE_DELETED", Duration::from_secs(5), |e| {
                e.name == "DEVICE_DELETED" && e.data["device"] == "fn0"
            })
            .unwrap();
        assert_eq!(e.data["device"], "fn0");
        // The event read before the reply was kept.
        let ost = qmp
            .wait_event("ost", Duration::from_secs(1), |e| {
                e.name == "ACPI_DEVICE_OST"
            })
            .unwrap();
        assert_eq!(ost.name, "ACPI_DEVICE_OST");
        let e = qmp
            .execute("chardev-remove", json!({"id": "x"}))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "QMP chardev-remove: GenericError: Chardev 'x' not found"
        );
        drop(qmp);
        peer.join().unwrap();
    }

    #[test]
    fn an_event_that_never_comes_times_out_and_a_closed_monitor_is_said() {
        let (mut qmp, peer) = qemu(vec![("qmp_capabilities", vec![r#"{"return": {}}"#])]);
        let e = qmp
            .wait_event("DEVICE_DELETED of fn0", Duration::from_millis(100), |e| {
                e.name == "DEVICE_DELETED"
            })
            .unwrap_err();
        assert_eq!(e.to_string(), "QMP: no DEVICE_DELETED of fn0 within 100ms");
        assert!(matches!(
            qmp.execute("quit", json!({})).unwrap_err(),
            QmpError::Closed | QmpError::Io(_)
        ));
        peer.join().unwrap();
    }
}
