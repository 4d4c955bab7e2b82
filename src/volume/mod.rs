//! placeholder: filled by the volume work.
