//! Prompts as the experiments hold them: prompt files in the datasets' own JSONL shapes (PKU-SafeRLHF's
//! `prompt` field, HH-RLHF's `chosen` dialogue, plain strings), and prompt templates (`"BEGINNING OF
//! CONVERSATION: USER: {prompt} ASSISTANT:"`) that put a prompt into the text a model was trained on.

use crate::error::{CageError, Result};
use std::path::Path;

/// The placeholder a template holds exactly once.
pub const PLACEHOLDER: &str = "{prompt}";

/// A prompt template: text with exactly one `{prompt}`, checked when it is read (a template without it would
/// decode every prompt as the same text).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PromptTemplate(String);

impl TryFrom<String> for PromptTemplate {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        match s.matches(PLACEHOLDER).count() {
            1 => Ok(PromptTemplate(s)),
            n => Err(format!("a prompt template must hold {PLACEHOLDER} exactly once, {s:?} holds it {n} times")),
        }
    }
}

impl From<PromptTemplate> for String {
    fn from(t: PromptTemplate) -> String {
        t.0
    }
}

impl PromptTemplate {
    /// The template with `prompt` in place of `{prompt}` (braces in the prompt are left as they are).
    pub fn render(&self, prompt: &str) -> String {
        self.0.replacen(PLACEHOLDER, prompt, 1)
    }
}

/// The prompt of an HH-RLHF dialogue (`"\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant: ..."`):
/// the dialogue up to and including its last `Assistant:` marker, so the model writes that last turn. `None`
/// when the text has no `\n\nAssistant:` turn.
pub fn hh_prompt(dialogue: &str) -> Option<&str> {
    const TURN: &str = "\n\nAssistant:";
    dialogue.rfind(TURN).map(|at| &dialogue[..at + TURN.len()])
}

/// The prompt of one JSONL value: a string, an object's `prompt` (PKU-SafeRLHF and most prompt sets), or the
/// dialogue before the last assistant turn of an object's `chosen` (HH-RLHF).
fn prompt_of(v: &serde_json::Value) -> std::result::Result<String, &'static str> {
    if let Some(s) = v.as_str() {
        return Ok(s.to_string());
    }
    if let Some(p) = v.get("prompt") {
        return p.as_str().map(str::to_string).ok_or("its \"prompt\" is not a string");
    }
    match v.get("chosen").map(|c| c.as_str().map(hh_prompt)) {
        Some(Some(Some(p))) => Ok(p.to_string()),
        Some(Some(None)) => Err("its \"chosen\" dialogue has no \"\\n\\nAssistant:\" turn"),
        Some(None) => Err("its \"chosen\" is not a string"),
        None => Err("expected a string, {\"prompt\": ...} or an HH-RLHF {\"chosen\": ...}"),
    }
}

/// Prompts from a JSONL file: each line a JSON string, an object with a `prompt` field, or an HH-RLHF record
/// (see [`hh_prompt`]).
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| CageError::Io { context: format!("reading prompts {}", path.display()), source })?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{} line {}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| CageError::InvalidArgument(format!("{}: {e}", at())))?;
        out.push(prompt_of(&v).map_err(|m| CageError::InvalidArgument(format!("{}: {m}", at())))?);
    }
    if out.is_empty() {
        return Err(CageError::InvalidArgument(format!("{} holds no prompts", path.display())));
    }
    Ok(out)
}
