//! A PIN typed at a keyboard is not echoed: with standard input on a
//! terminal (a pseudo-terminal here), `QuietLines` turns echo off while it
//! lives, hands over what was typed, and puts the terminal back.
//!
//! This test replaces its own process's standard input; nextest runs each
//! test in a process of its own.

use std::io::{Read, Write};

use pivgate_hw::keypad::sim::QuietLines;
use rustix::termios::{tcgetattr, LocalModes};

#[test]
fn a_pin_typed_at_a_terminal_is_not_echoed() {
    let master = rustix::pty::openpt(rustix::pty::OpenptFlags::RDWR | rustix::pty::OpenptFlags::NOCTTY).expect("openpt");
    rustix::pty::grantpt(&master).expect("grantpt");
    rustix::pty::unlockpt(&master).expect("unlockpt");
    let name = rustix::pty::ptsname(&master, Vec::new()).expect("ptsname");
    let slave = std::fs::OpenOptions::new().read(true).write(true).open(name.to_str().expect("name")).expect("slave");
    rustix::stdio::dup2_stdin(&slave).expect("stdin on the terminal");
    assert!(tcgetattr(&slave).unwrap().local_modes.contains(LocalModes::ECHO), "a terminal echoes by default");

    let mut master = std::fs::File::from(master);
    let mut lines = QuietLines::stdin();
    assert!(!tcgetattr(&slave).unwrap().local_modes.contains(LocalModes::ECHO), "echo still on while a PIN is typed");
    master.write_all(b"123456\n").unwrap();
    assert_eq!(lines.next_line().expect("a line").as_str(), "123456");
    // What the terminal showed: the newline only.
    rustix::io::ioctl_fionbio(&master, true).unwrap();
    let mut shown = Vec::new();
    let _ = master.read_to_end(&mut shown);
    assert!(!String::from_utf8_lossy(&shown).contains("123456"), "the PIN was echoed: {shown:?}");
    drop(lines);
    assert!(tcgetattr(&slave).unwrap().local_modes.contains(LocalModes::ECHO), "echo not restored");
}
