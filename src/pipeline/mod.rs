//! Pipeline YAML: types, interpolation, overrides, expansion, validation.
