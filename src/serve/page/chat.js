// The chat page: keeps the conversation in the page, sends it to /v1/chat/completions with
// streaming on, shows the reply as it arrives, and the figures of the last reply (tok/s, the KV
// cache reuse, the expert cache's hits and misses). Stop aborts the request; the server stops
// that generation at its next token.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // {role, content} of the finished turns
let controller = null; // the AbortController of the running request
let modelName = "";

function setState(state) {
  document.body.dataset.state = state;
  $("send").disabled = state === "generating";
  $("stop").disabled = state !== "generating";
}

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.appendChild(body);
  $("messages").appendChild(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function addNote(li, text) {
  const note = document.createElement("span");
  note.className = "note";
  note.textContent = text;
  li.appendChild(note);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    model: modelName,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  return body;
}

function fmt(x, digits = 1) {
  return Number.isFinite(x) ? x.toFixed(digits) : "–";
}

function showStats(timings, usage, stopped) {
  if (!timings) {
    $("stats").textContent = stopped ? "Stopped." : "No figures for this reply.";
    return;
  }
  const parts = [
    `${timings.predicted_n + 1} tokens`,
    `decode ${fmt(timings.predicted_per_second)} tok/s`,
    `prompt ${timings.prompt_n} new + ${timings.cache_n} reused tokens at ${fmt(timings.prompt_per_second)} tok/s`,
  ];
  const c = timings.expert_cache;
  if (c) {
    const total = c.hits + c.misses;
    const rate = total ? (100 * c.hits) / total : 0;
    parts.push(`expert cache ${c.hits} hits / ${c.misses} misses (${fmt(rate)}%), ` +
      `${fmt(c.resident_bytes / 1048576)} of ${fmt(c.budget_bytes / 1048576)} MiB`);
  }
  if (usage) parts.push(`usage ${usage.prompt_tokens} + ${usage.completion_tokens} tokens`);
  $("stats").textContent = parts.join(" · ");
}

// Reads an SSE body, calling onData with each event's data field.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data && onData(data) === false) return;
    }
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message ?? `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const li = addMessage("assistant", "");
  li.classList.add("streaming");
  const out = li.querySelector(".text");
  controller = new AbortController();
  setState("generating");
  let reply = "";
  let timings = null;
  let usage = null;
  let finish = null;
  let stopped = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response, (data) => {
      if (data === "[DONE]") return false;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices?.[0];
      if (choice?.delta?.content) {
        reply += choice.delta.content;
        out.textContent = reply;
        li.scrollIntoView({ block: "end" });
      }
      if (choice?.finish_reason) finish = choice.finish_reason;
      if (event.timings) timings = event.timings;
      if (event.usage) usage = event.usage;
      return true;
    });
  } catch (e) {
    if (e.name === "AbortError") {
      stopped = true;
    } else {
      li.classList.remove("streaming");
      li.remove();
      history.pop();
      addMessage("error", `Error: ${e.message}`);
      $("stats").textContent = "The last request failed.";
      controller = null;
      setState("idle");
      return;
    }
  }
  li.classList.remove("streaming");
  history.push({ role: "assistant", content: reply });
  if (stopped) addNote(li, "(stopped)");
  else if (finish === "length") addNote(li, "(cut at the token limit)");
  li.dataset.finish = stopped ? "stopped" : finish ?? "";
  showStats(timings, usage, stopped);
  controller = null;
  setState("idle");
}

async function loadModelName() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    modelName = body.data?.[0]?.id ?? "";
    $("model").textContent = modelName;
  } catch (e) {
    $("model").textContent = `(model unknown: ${e.message})`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setState("idle");
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("new").addEventListener("click", () => {
    controller?.abort();
    history.length = 0;
    $("messages").replaceChildren();
    $("stats").textContent = "No reply yet.";
  });
  for (const [input, output] of [["temperature", "temperature-value"], ["top-p", "top-p-value"]]) {
    $(input).addEventListener("input", () => { $(output).textContent = $(input).value; });
  }
  $("api-key").addEventListener("change", loadModelName);
  loadModelName();
});
