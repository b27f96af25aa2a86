//! A bouncer of CrowdSec's Local API (LAPI): `GET /v1/decisions/stream` with the bouncer's
//! key, `startup=true` the first time (every active decision), then the changes since the
//! last call. `ban` decisions of scope `Ip` and `Range` become blocklist entries until the
//! decision's end; deleted (or expired) decisions are removed; everything else is counted and
//! left alone. The parsing is pure; `poll` is the one network call.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use ipnet::IpNet;
use serde::Deserialize;

use crate::blocklist::{self, Deadline, MAX_TIMEOUT};

/// The origin of the entries this feed makes.
pub const ORIGIN: &str = "crowdsec";

/// The most a stream answer may hold (1M decisions are ~250 MiB of JSON).
pub const MAX_BODY: usize = 512 << 20;

/// `crowdsec+http://HOST:PORT[/PATH]`: where the LAPI is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lapi {
    pub host: String,
    pub port: u16,
    /// The path before `/v1/...`, without a trailing slash ("" mostly).
    pub base: String,
}

impl std::str::FromStr for Lapi {
    type Err = String;
    fn from_str(s: &str) -> Result<Lapi, String> {
        let rest = s.strip_prefix("crowdsec+http://").ok_or_else(|| {
            if s.starts_with("crowdsec+https://") {
                format!("'{s}': only plain HTTP to a Local API is supported (run this beside the LAPI, or put it on a private link)")
            } else {
                format!("'{s}': expected crowdsec+http://HOST:PORT (CrowdSec's Local API)")
            }
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        // HOST, HOST:PORT, [V6]:PORT.
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') && (!h.contains(':') || h.ends_with(']')) => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("'{s}': bad port '{p}'"))?,
            ),
            _ => (authority, 8080),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains(['@', '?', '#', ' ', '[', ']']) {
            return Err(format!("'{s}': bad host '{host}'"));
        }
        Ok(Lapi {
            host: host.to_string(),
            port,
            base: path.trim_end_matches('/').to_string(),
        })
    }
}

impl std::fmt::Display for Lapi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(
                f,
                "crowdsec+http://[{}]:{}{}",
                self.host, self.port, self.base
            )
        } else {
            write!(
                f,
                "crowdsec+http://{}:{}{}",
                self.host, self.port, self.base
            )
        }
    }
}

/// One decision as the stream gives it.
#[derive(Clone, Debug, Deserialize)]
pub struct Decision {
    pub duration: String,
    pub scope: String,
    pub value: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// One answer of the stream.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Stream {
    #[serde(default)]
    pub new: Option<Vec<Decision>>,
    #[serde(default)]
    pub deleted: Option<Vec<Decision>>,
}

/// A stream answer as blocklist changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub add: Vec<(IpNet, Deadline)>,
    pub del: Vec<IpNet>,
    /// Decisions left alone: another type (captcha), another scope (Country, AS), a value
    /// that is no address or range, a /0, a duration already over.
    pub ignored: usize,
}

/// A Go duration (`time.Duration.String()`): "3h59m55.7s", "18.77s", "-19.9ms", "1m".
pub fn parse_go_duration(s: &str) -> Option<f64> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0.0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&n| n > 0)?;
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let (unit, secs) = [
            ("ns", 1e-9),
            ("us", 1e-6),
            ("µs", 1e-6),
            ("ms", 1e-3),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
        ]
        .into_iter()
        // "ms" before "m": the longest unit that fits.
        .filter(|(u, _)| rest.starts_with(u))
        .max_by_key(|(u, _)| u.len())?;
        total += value * secs;
        rest = &rest[unit.len()..];
    }
    Some(if neg { -total } else { total })
}

/// The entry a decision blocks, if it is one this bouncer enforces.
fn entry(d: &Decision) -> Option<IpNet> {
    if !d.kind.eq_ignore_ascii_case("ban") {
        return None;
    }
    let n = if d.scope.eq_ignore_ascii_case("ip") {
        d.value.parse::<std::net::IpAddr>().ok().map(IpNet::from)?
    } else if d.scope.eq_ignore_ascii_case("range") {
        crate::policy::parse_member(&d.value).filter(|_| d.value.contains('/'))?
    } else {
        return None;
    };
    crate::policy::check_block_entry(&n).ok().map(|()| n)
}

/// What an answer changes, at `now` (Unix ms). The Local API sends one decision per value
/// (the longest), and a value as deleted only once no decision holds it any more (checked
/// with CrowdSec 1.4: a second, longer ban of an address is sent alone; deleting it while
/// a shorter one still runs sends nothing): so a deleted value is unblocked, whatever
/// decision it came with. Deletions go first: a value deleted and banned again in one answer
/// stays blocked. A duration beyond ipset's longest timeout is cut to it (both backends hold
/// the same).
pub fn changes(s: &Stream, now: Deadline) -> Changes {
    let mut out = Changes::default();
    for d in s.deleted.iter().flatten() {
        match entry(d) {
            Some(n) => out.del.push(n),
            None => out.ignored += 1,
        }
    }
    for d in s.new.iter().flatten() {
        let secs = parse_go_duration(&d.duration)
            .filter(|s| *s > 0.0)
            .map(|s| s.min(MAX_TIMEOUT.as_secs_f64()));
        match (entry(d), secs) {
            (Some(n), Some(secs)) => out.add.push((n, now + (secs * 1000.0) as u64)),
            _ => out.ignored += 1,
        }
    }
    // The latest deadline of a value given twice.
    out.add.sort_by_key(|(n, d)| (*n, std::cmp::Reverse(*d)));
    out.add.dedup_by_key(|(n, _)| *n);
    // Deleted and banned again: the ban stands (the engine removes, then adds).
    out
}

/// The bouncer's key, from a file only root may change (`-` not accepted: the key is a
/// secret and the service runs unattended).
pub fn read_key(path: &std::path::Path) -> Result<String> {
    let text = crate::state::read_trusted("CrowdSec bouncer key", path)?;
    let key = text.trim();
    if key.is_empty() || key.len() > 256 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        bail!(
            "{}: expected the bouncer key `cscli bouncers add NAME -o raw` printed, on one line",
            path.display()
        );
    }
    Ok(key.to_string())
}

/// One call of the stream (`startup`: every active decision). Errors say what failed: the
/// connection, the status (403: a wrong key), or the body.
pub async fn poll(lapi: &Lapi, key: &str, startup: bool, timeout: Duration) -> Result<Stream> {
    tokio::time::timeout(timeout, poll_inner(lapi, key, startup))
        .await
        .map_err(|_| anyhow!("{lapi} did not answer within {} s", timeout.as_secs()))?
}

async fn poll_inner(lapi: &Lapi, key: &str, startup: bool) -> Result<Stream> {
    use http_body_util::{BodyExt as _, Empty, Limited};
    let stream = tokio::net::TcpStream::connect((lapi.host.as_str(), lapi.port))
        .await
        .with_context(|| format!("cannot connect to {lapi}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .with_context(|| format!("cannot talk HTTP to {lapi}"))?;
    let driver = tokio::spawn(conn);
    let path = format!(
        "{}/v1/decisions/stream{}",
        lapi.base,
        if startup { "?startup=true" } else { "" }
    );
    let req = hyper::Request::get(path)
        .header(
            hyper::header::HOST,
            if lapi.host.contains(':') {
                format!("[{}]:{}", lapi.host, lapi.port)
            } else {
                format!("{}:{}", lapi.host, lapi.port)
            },
        )
        .header("X-Api-Key", key)
        .header(
            hyper::header::USER_AGENT,
            format!("isolation-bouncer/{}", crate::VERSION),
        )
        .body(Empty::<hyper::body::Bytes>::new())?;
    let resp = send
        .send_request(req)
        .await
        .with_context(|| format!("{lapi} dropped the request"))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| anyhow!("cannot read the answer of {lapi}: {e}"))?
        .to_bytes();
    driver.abort();
    if status == hyper::StatusCode::FORBIDDEN || status == hyper::StatusCode::UNAUTHORIZED {
        bail!("{lapi} refused the bouncer key ({status}): check --crowdsec-key-file");
    }
    if !status.is_success() {
        bail!("{lapi} answered {status}");
    }
    serde_json::from_slice(&body).with_context(|| format!("{lapi} sent a stream that is not JSON"))
}

/// What an answer changed, in words: "3 added, 1 removed".
pub fn summary(c: &Changes) -> String {
    format!(
        "{} added, {} removed{}",
        c.add.len(),
        c.del.len(),
        if c.ignored > 0 {
            format!(", {} not enforced (not a ban of an Ip or Range)", c.ignored)
        } else {
            String::new()
        }
    )
}

/// `blocklist::now_ms`, here for the service.
pub fn now() -> Deadline {
    blocklist::now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let cases = [
            ("18.774408293s", 18.774408293),
            ("59m59.774405487s", 3599.774405487),
            ("3h59m55.756182786s", 14395.756182786),
            ("-19.927135ms", -0.019927135),
            ("1h", 3600.0),
            ("4h0m0s", 14400.0),
            ("1.5µs", 1.5e-6),
            ("0", 0.0),
        ];
        for (s, want) in cases {
            let got = parse_go_duration(s).unwrap();
            assert!((got - want).abs() < 1e-9, "{s}: {got}");
        }
        for bad in ["", "s", "1x", "1h-2m", "h1"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn stream_answers_become_blocklist_changes() {
        let s: Stream = serde_json::from_str(
            r#"{"deleted":[{"duration":"-1ms","id":1,"origin":"cscli","scenario":"x","scope":"Ip","type":"ban","value":"198.51.100.7"}],
                "new":[{"duration":"20s","id":2,"origin":"cscli","scenario":"x","scope":"Ip","type":"ban","value":"198.51.100.7"},
                       {"duration":"1h","id":3,"scope":"Range","type":"ban","value":"203.0.113.0/24"},
                       {"duration":"1h","id":4,"scope":"Ip","type":"ban","value":"2001:db8::5"},
                       {"duration":"1h","id":5,"scope":"Ip","type":"captcha","value":"192.0.2.9"},
                       {"duration":"1h","id":6,"scope":"Country","type":"ban","value":"FR"},
                       {"duration":"1h","id":7,"scope":"Range","type":"ban","value":"0.0.0.0/0"},
                       {"duration":"9999h","id":8,"scope":"ip","type":"BAN","value":"192.0.2.10"},
                       {"duration":"-5s","id":9,"scope":"Ip","type":"ban","value":"192.0.2.11"}]}"#,
        )
        .unwrap();
        let c = changes(&s, 1_000);
        let n = |s: &str| crate::policy::parse_net(s).unwrap();
        // Deleted and banned again in one answer: removed, then added (blocked).
        assert_eq!(c.del, vec![n("198.51.100.7")]);
        let mut add = c.add.clone();
        add.sort();
        assert_eq!(
            add,
            vec![
                (n("192.0.2.10"), 1_000 + MAX_TIMEOUT.as_millis() as u64),
                (n("198.51.100.7"), 21_000),
                (n("203.0.113.0/24"), 3_601_000),
                (n("2001:db8::5"), 3_601_000),
            ]
        );
        assert_eq!(c.ignored, 4);
        let empty: Stream = serde_json::from_str(r#"{"deleted":null,"new":null}"#).unwrap();
        assert_eq!(changes(&empty, 0), Changes::default());
    }

    #[test]
    fn lapi_urls() {
        let l: Lapi = "crowdsec+http://127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            (l.host.as_str(), l.port, l.base.as_str()),
            ("127.0.0.1", 8080, "")
        );
        let l: Lapi = "crowdsec+http://lapi.internal/prefix/".parse().unwrap();
        assert_eq!(
            (l.host.as_str(), l.port, l.base.as_str()),
            ("lapi.internal", 8080, "/prefix")
        );
        let l: Lapi = "crowdsec+http://[::1]:8081".parse().unwrap();
        assert_eq!((l.host.as_str(), l.port), ("::1", 8081));
        assert_eq!(l.to_string(), "crowdsec+http://[::1]:8081");
        for bad in [
            "http://127.0.0.1:8080",
            "crowdsec+https://x:1",
            "crowdsec+http://:80",
            "crowdsec+http://h:0",
        ] {
            assert!(bad.parse::<Lapi>().is_err(), "{bad}");
        }
    }
}
