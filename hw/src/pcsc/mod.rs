//! PC/SC through pcsc-lite (pcscd): the card transport, the reader monitor
//! and PIN-pad readers.
//!
//! PC/SC calls block. [`PcscCard`] is meant to live on a thread of its own
//! (one per reader); [`monitor`] runs its own thread and reports through a
//! callback, so async code reaches both over channels.
//!
//! One PC/SC transaction wraps each multi-APDU exchange: take a
//! [`PcscCard::transaction`], build a [`crate::piv::PivClient`] over it, and
//! the transaction ends when the client is dropped. The borrow checker keeps
//! a second transaction from opening on the same card meanwhile.

pub mod monitor;
pub mod pinpad;

use std::ffi::{CStr, CString};

pub use ::pcsc::Context;
use ::pcsc::{Disposition, Protocols, Scope, ShareMode};

use crate::error::{Error, Result};
use crate::transport::Transport;

pub use monitor::{Monitor, ReaderEvent};

/// Maps pcsc-lite errors to what the agent can act on.
pub(crate) fn map_err(e: ::pcsc::Error) -> Error {
    use ::pcsc::Error as E;
    match e {
        E::RemovedCard | E::ResetCard | E::NoSmartcard | E::UnpoweredCard | E::UnresponsiveCard => Error::CardRemoved,
        E::ReaderUnavailable | E::UnknownReader | E::NoReadersAvailable => Error::ReaderUnavailable,
        E::NoService | E::ServiceStopped | E::CommError | E::InvalidHandle => Error::ServiceUnavailable,
        other => Error::Pcsc(other),
    }
}

/// Opens a PC/SC context (a connection to pcscd).
pub fn establish() -> Result<Context> {
    Context::establish(Scope::User).map_err(map_err)
}

/// Lists reader names; none is not an error.
pub fn list_readers(ctx: &Context) -> Result<Vec<String>> {
    match ctx.list_readers_owned() {
        Ok(names) => Ok(names.into_iter().map(|n| n.to_string_lossy().into_owned()).collect()),
        Err(::pcsc::Error::NoReadersAvailable) => Ok(Vec::new()),
        Err(e) => Err(map_err(e)),
    }
}

/// A card connected through pcscd.
pub struct PcscCard {
    card: ::pcsc::Card,
    reader: String,
    extended: bool,
    atr: Vec<u8>,
}

impl PcscCard {
    /// Connects to the card in `reader`, shared, T=0 or T=1.
    pub fn connect(ctx: &Context, reader: &str) -> Result<PcscCard> {
        let name = CString::new(reader).map_err(|_| Error::InvalidInput("reader name contains NUL"))?;
        let card = ctx.connect(&name, ShareMode::Shared, Protocols::ANY).map_err(map_err)?;
        // Extended length only when both ends say so: the card in its ATR,
        // the reader by taking more than a short APDU (SCARD_ATTR_MAXINPUT;
        // readers that do not answer are taken as short-only).
        let atr = card.status2_owned().map(|s| s.atr().to_vec()).unwrap_or_default();
        let reader_max = card
            .get_attribute_owned(::pcsc::Attribute::Maxinput)
            .ok()
            .and_then(|v| v.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .unwrap_or(0);
        let extended = atr_supports_extended(&atr) && reader_max > 261;
        Ok(PcscCard { card, reader: reader.to_string(), extended, atr })
    }

    /// The reader's name.
    pub fn reader(&self) -> &str {
        &self.reader
    }

    /// The card's ATR.
    pub fn atr(&self) -> Result<Vec<u8>> {
        let status = self.card.status2_owned().map_err(map_err)?;
        Ok(status.atr().to_vec())
    }

    /// Begins a PC/SC transaction (exclusive access for one exchange).
    pub fn transaction(&mut self) -> Result<PcscTransaction<'_>> {
        let extended = self.extended;
        let tx = self.card.transaction().map_err(map_err)?;
        Ok(PcscTransaction { tx: Some(tx), extended, atr: &self.atr })
    }

    /// Sends a reader control code (SCardControl), for PIN-pad features.
    pub fn control(&self, code: u32, input: &[u8]) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; ::pcsc::MAX_BUFFER_SIZE];
        let out = self.card.control(code as _, input, &mut buf).map_err(map_err)?;
        Ok(out.to_vec())
    }

    /// Disconnects, resetting the card when `reset` (which also clears any
    /// verified PIN on cards that ignore VERIFY P1=FF).
    pub fn disconnect(self, reset: bool) -> Result<()> {
        let d = if reset { Disposition::ResetCard } else { Disposition::LeaveCard };
        self.card.disconnect(d).map_err(|(_, e)| map_err(e))
    }
}

/// One PC/SC transaction; the [`Transport`] for a card in a reader.
pub struct PcscTransaction<'a> {
    tx: Option<::pcsc::Transaction<'a>>,
    extended: bool,
    atr: &'a [u8],
}

/// Something that takes reader control codes (SCardControl).
pub trait ReaderControl {
    /// Sends a control code with input; returns the output.
    fn control(&self, code: u32, input: &[u8]) -> Result<Vec<u8>>;
}

impl ReaderControl for PcscCard {
    fn control(&self, code: u32, input: &[u8]) -> Result<Vec<u8>> {
        PcscCard::control(self, code, input)
    }
}

impl ReaderControl for PcscTransaction<'_> {
    fn control(&self, code: u32, input: &[u8]) -> Result<Vec<u8>> {
        let tx = self.tx.as_ref().ok_or(Error::CardRemoved)?;
        let mut buf = vec![0u8; ::pcsc::MAX_BUFFER_SIZE];
        let out = tx.control(code as _, input, &mut buf).map_err(map_err)?;
        Ok(out.to_vec())
    }
}

impl PcscTransaction<'_> {
    /// Whether the card is still in the reader and powered.
    pub fn present(&self) -> bool {
        self.tx
            .as_ref()
            .and_then(|tx| tx.status2_owned().ok())
            .is_some_and(|s| s.status().contains(::pcsc::Status::PRESENT) && !s.status().contains(::pcsc::Status::ABSENT))
    }

    /// Ends the transaction, resetting the card when `reset`.
    pub fn end(mut self, reset: bool) -> Result<()> {
        let d = if reset { Disposition::ResetCard } else { Disposition::LeaveCard };
        match self.tx.take() {
            Some(tx) => tx.end(d).map_err(|(_, e)| map_err(e)),
            None => Ok(()),
        }
    }
}

impl Transport for PcscTransaction<'_> {
    fn supports_extended(&self) -> bool {
        self.extended
    }

    fn atr(&self) -> Option<&[u8]> {
        (!self.atr.is_empty()).then_some(self.atr)
    }

    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>> {
        let tx = self.tx.as_ref().ok_or(Error::CardRemoved)?;
        // pcsc-lite caps responses at MAX_BUFFER_SIZE_EXTENDED; a buffer of
        // that size bounds what any card can hand us.
        let mut buf = vec![0u8; ::pcsc::MAX_BUFFER_SIZE_EXTENDED];
        let out = tx.transmit(command, &mut buf).map_err(map_err)?;
        // A card that leaves during the exchange can come back as a
        // "successful" transmit of zero bytes (vpcd does this); without
        // even a status word there is no card to talk to.
        if out.is_empty() {
            return Err(Error::CardRemoved);
        }
        Ok(out.to_vec())
    }
}

/// Whether an ATR announces extended Lc and Le fields: the card
/// capabilities in the historical bytes (compact-TLV tag 7, third byte,
/// bit 0x40; ISO/IEC 7816-4 §12.1.1.9). Malformed ATRs say no.
pub fn atr_supports_extended(atr: &[u8]) -> bool {
    let Some(&t0) = atr.get(1) else { return false };
    let historical = usize::from(t0 & 0x0F);
    let mut y = t0 >> 4;
    let mut i = 2;
    loop {
        // TA, TB, TC are present per bits 1 to 3 of Y; TD per bit 4.
        i += (y & 0x07).count_ones() as usize;
        if y & 0x08 == 0 {
            break;
        }
        let Some(&td) = atr.get(i) else { return false };
        i += 1;
        y = td >> 4;
    }
    let Some(hist) = atr.get(i..i + historical) else { return false };
    if hist.first() != Some(&0x80) {
        return false;
    }
    let mut rest = &hist[1..];
    while let Some((&b, r)) = rest.split_first() {
        let (tag, len) = (b >> 4, usize::from(b & 0x0F));
        let Some(value) = r.get(..len) else { return false };
        if tag == 0x7 && len >= 3 {
            return value[2] & 0x40 != 0;
        }
        rest = &r[len..];
    }
    false
}

/// The name of pcsc-lite's PnP notification pseudo-reader.
pub fn pnp_reader() -> &'static CStr {
    ::pcsc::PNP_NOTIFICATION()
}

/// Waits until `reader` holds a card (`present`) or is empty (`!present`),
/// up to `timeout`. Returns whether that state was reached.
pub fn wait_for_card(ctx: &Context, reader: &str, present: bool, timeout: std::time::Duration) -> Result<bool> {
    let name = CString::new(reader).map_err(|_| Error::InvalidInput("reader name contains NUL"))?;
    let deadline = std::time::Instant::now() + timeout;
    let mut states = [::pcsc::ReaderState::new(name, ::pcsc::State::UNAWARE)];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match ctx.get_status_change(left, &mut states) {
            Ok(()) => {}
            Err(::pcsc::Error::Timeout) => return Ok(false),
            Err(e) => return Err(map_err(e)),
        }
        let ev = states[0].event_state();
        let has_card = ev.contains(::pcsc::State::PRESENT) && !ev.contains(::pcsc::State::MUTE);
        if has_card == present {
            return Ok(true);
        }
        states[0].sync_current_state();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_extended_length_from_the_atr() {
        // YubiKey 5: card capabilities 73 C0 21 C0, extended Lc/Le.
        let yubikey = hex::decode("3BFD1300008131FE158073C021C057597562694B657940").unwrap();
        assert!(atr_supports_extended(&yubikey));
        // The virtual card: only the PIV AID in its historical bytes.
        assert!(!atr_supports_extended(&hex::decode("3B8B800180F9A00000030800001000C8").unwrap()));
        assert!(!atr_supports_extended(&[0x3B]));
        assert!(!atr_supports_extended(&[0x3B, 0xFF, 0x00]));
        let mut no_ext = yubikey.clone();
        no_ext[13] = 0x80; // third capability byte without bit 0x40
        assert!(!atr_supports_extended(&no_ext));
    }
}
