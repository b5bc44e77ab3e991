//! Chat: the model's chat template rendered as transformers renders it ([`template`]), and
//! conversations that keep their session between turns ([`conversation`]).

mod conversation;
mod template;

#[cfg(test)]
mod tests;

pub use conversation::Conversation;
pub use template::{ChatMessage, ChatTemplate};
