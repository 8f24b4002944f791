//! Layer keys: the one place a layer's key is released for a request.

pub mod broker_client;
