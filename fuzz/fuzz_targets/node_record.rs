//! A node record in etcd (`P/nodes/NAME`: the name, a NUL byte, then the value), as
//! `fleet status` reads and prints it: never panics, and what reaches the admin's terminal
//! holds no control character but the line ends.
#![no_main]

use isolation_user::{commands::fleet::status_text, fleet::NodeEntry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (name, value) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"n"[..], data),
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    let entry = NodeEntry::read(name, value);
    let text = status_text(std::slice::from_ref(&entry), 7, 1e9, "/fuzz/policy");
    if let Some(c) = text.chars().find(|c| c.is_control() && *c != '\n') {
        panic!("a control character {c:?} reaches the terminal: {text:?}");
    }
});
