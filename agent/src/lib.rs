//! The pivgate agent: watches the terminal's reader, reads the PIV card,
//! takes the PIN from the keypad to the card, has the card sign the
//! gateway's challenge and drives the indicators.
//!
//! Not built yet (see the agent issue); this crate holds only this comment so
//! the workspace layout is real.
#![forbid(unsafe_code)]
