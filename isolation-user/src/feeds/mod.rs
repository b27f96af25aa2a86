//! Blocklist feeds: where bans come from besides the operator. Each turns what its source
//! says into `engine::BlockEdit::Feed` changes, which the service commits; the entries carry
//! the feed's name as their origin (`block list` shows it).
//!
//! fail2ban needs no code here: its action calls `block add --timeout` and `block del`
//! (`packaging/fail2ban/action.d/isolation.conf`).

pub mod crowdsec;
