//! `kiln debug plan`: print the resolved build plan as JSON.
