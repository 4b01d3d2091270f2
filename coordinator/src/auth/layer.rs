//! See the module docs of [`crate::auth`].
