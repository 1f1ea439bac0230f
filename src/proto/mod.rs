//! Wire messages. `agent`: the JSON messages of the agent protocol (docs/protocol.md).
//! Pure: bytes in, values out, no IO.

pub mod agent;
