//! The virtual card's one error type.

/// What can go wrong making, loading or saving a virtual card.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A card profile on disk is incomplete or inconsistent, or a key or
    /// certificate could not be made.
    #[error("card profile: {0}")]
    Profile(String),
    /// An algorithm this card does not have (its PIV identifier).
    #[error("unsupported algorithm {0:#04x}")]
    Algorithm(u8),
    /// Reading or writing a profile failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The PIV side (TLV, objects) refused what the profile holds.
    #[error("{0}")]
    Piv(#[from] pivgate_hw::Error),
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
