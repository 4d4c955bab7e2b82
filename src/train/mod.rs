//! placeholder: filled by the train work.
