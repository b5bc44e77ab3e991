// The chat page of `moe-edge serve`, driven in headless Chromium (Debian's chromium, through
// playwright-core): a message typed and sent, the reply equal to the server's
// non-streamed answer to the same conversation, a second turn reusing the KV cache,
// the stop button cutting a long reply, and a screenshot kept as a CI artifact.
//
//   node tests/browser/chat_page.mjs target/debug/moe-edge [screenshot.png]
//
// Builds the chat-capable tiny model (models/tiny-mixtral with the chat fixtures' tokenizer and
// ChatML template) in a temporary directory, starts the server on a free loopback port, and
// stops it with SIGTERM at the end (it must exit 0). Exits non-zero on any failure.
import { spawn } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const binary = resolve(process.argv[2] ?? join(ROOT, "target/debug/moe-edge"));
const screenshot = resolve(process.argv[3] ?? join(ROOT, "target/ci-artifacts/chat-page.png"));
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const SYSTEM = "Be brief.";
// sampled with a seed: deterministic, and livelier than greedy text on a random-weight model
const SAMPLING = { temperature: 1, top_p: 1, seed: 1 };

function chatModel() {
  const dir = mkdtempSync(join(tmpdir(), "moe-edge-page-"));
  for (const f of ["model.onnx", "config.json"]) copyFileSync(join(ROOT, "models/tiny-mixtral", f), join(dir, f));
  copyFileSync(join(ROOT, "tests/fixtures/chat/tokenizer.json"), join(dir, "tokenizer.json"));
  copyFileSync(join(ROOT, "tests/fixtures/chat/chatml.jinja"), join(dir, "chat_template.jinja"));
  writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify({ eos_token: "<|im_end|>" }));
  return dir;
}

function startServer(model) {
  const runner = (process.env.MOE_EDGE_TEST_RUNNER ?? "").split(/\s+/).filter(Boolean);
  const argv = [...runner, binary, "serve", "-m", model, "--addr", "127.0.0.1:0", "--model-name", "tiny",
    "--parallel", "1"];
  const server = spawn(argv[0], argv.slice(1), { stdio: ["ignore", "inherit", "pipe"] });
  const address = new Promise((ok, fail) => {
    let seen = "";
    server.stderr.on("data", (chunk) => {
      process.stderr.write(chunk);
      seen += chunk;
      const m = seen.match(/listening on (http:\/\/\S+)/);
      if (m) ok(m[1]);
    });
    server.on("exit", (code) => fail(new Error(`the server exited (${code}) before listening`)));
    setTimeout(() => fail(new Error("the server did not start within 120 s")), 120_000);
  });
  return { server, address };
}

// The server's non-streamed answer: the reference the page's streamed reply must equal.
async function apiReply(base, messages, maxTokens, seed = SAMPLING.seed) {
  const response = await fetch(`${base}/v1/chat/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: "tiny", messages, ...SAMPLING, seed, max_tokens: maxTokens }),
  });
  if (!response.ok) throw new Error(`reference request: HTTP ${response.status} ${await response.text()}`);
  const body = await response.json();
  return { text: body.choices[0].message.content, finish: body.choices[0].finish_reason };
}

let failures = 0;
function check(name, ok, detail = "") {
  console.log(`${ok ? "ok  " : "FAIL"} ${name}${detail ? `: ${detail}` : ""}`);
  if (!ok) failures += 1;
}

// Sets the settings panel, then types `text` and sends it with Enter; resolves with the number
// of distinct texts the reply bubble showed while streaming and the final bubble state.
async function sendMessage(page, text, maxTokens, { stopAfterFirstPiece = false } = {}) {
  await page.fill("#max-tokens", String(maxTokens));
  await page.evaluate(() => {
    const before = document.querySelectorAll(".msg.assistant").length;
    window.__updates = [];
    const observer = new MutationObserver(() => {
      const replies = document.querySelectorAll(".msg.assistant .text");
      if (replies.length > before) {
        const t = replies[replies.length - 1].textContent;
        if (t && window.__updates[window.__updates.length - 1] !== t) window.__updates.push(t);
      }
    });
    observer.observe(document.getElementById("messages"), { childList: true, subtree: true, characterData: true });
  });
  await page.fill("#prompt", text);
  await page.press("#prompt", "Enter");
  await page.waitForSelector('body[data-state="generating"]', { timeout: 10_000 }).catch(() => {});
  if (stopAfterFirstPiece) {
    await page.waitForFunction(() => window.__updates.length >= 1, null, { timeout: 60_000 });
    await page.click("#stop");
  }
  await page.waitForSelector('body[data-state="idle"]', { timeout: 120_000 });
  return page.evaluate(() => {
    const replies = document.querySelectorAll(".msg.assistant");
    const last = replies[replies.length - 1];
    return {
      updates: window.__updates.length,
      text: last.querySelector(".text").textContent,
      finish: last.dataset.finish,
      stats: document.getElementById("stats").textContent,
      errors: document.querySelectorAll(".msg.error").length,
    };
  });
}

async function main() {
  const model = chatModel();
  const { server, address } = startServer(model);
  const exited = new Promise((ok) => server.on("exit", (code, signal) => ok({ code, signal })));
  let browser;
  try {
    const base = await address;
    browser = await chromium.launch({
      executablePath: chromiumPath,
      headless: true,
      args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"],
    });
    const page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
    const consoleErrors = [];
    page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
    page.on("pageerror", (e) => consoleErrors.push(String(e)));
    await page.goto(base + "/");
    await page.waitForFunction(() => document.getElementById("model").textContent === "tiny", null,
      { timeout: 10_000 }).catch(() => {});
    check("the page shows the served model's name", (await page.textContent("#model")) === "tiny");

    await page.fill("#system", SYSTEM);
    await page.evaluate((sampling) => {
      for (const [id, value] of [["temperature", sampling.temperature], ["top-p", sampling.top_p]]) {
        const input = document.getElementById(id);
        input.value = String(value);
        input.dispatchEvent(new Event("input"));
      }
    }, SAMPLING);
    await page.fill("#seed", String(SAMPLING.seed));

    // turn 1: a streamed reply equal to the API's non-streamed answer
    const user1 = "What does tar do?";
    const turn1 = await sendMessage(page, user1, 40);
    const ref1 = await apiReply(base, [{ role: "system", content: SYSTEM }, { role: "user", content: user1 }], 40);
    check("turn 1: the reply equals the server's non-streamed answer", turn1.text === ref1.text,
      `page ${JSON.stringify(turn1.text)} vs api ${JSON.stringify(ref1.text)}`);
    check("turn 1: the figures of the reply are shown", /decode [\d.]+ tok\/s/.test(turn1.stats) &&
      /prompt \d+ new \+ \d+ reused tokens/.test(turn1.stats), turn1.stats);
    check("turn 1: no error shown", turn1.errors === 0);

    // turn 2: the kept session's KV cache is reused (one slot, so the same worker)
    const user2 = "And gzip?";
    const turn2 = await sendMessage(page, user2, 40);
    const ref2 = await apiReply(base, [{ role: "system", content: SYSTEM }, { role: "user", content: user1 },
      { role: "assistant", content: ref1.text }, { role: "user", content: user2 }], 40);
    check("turn 2: the reply equals the server's non-streamed answer", turn2.text === ref2.text,
      `page ${JSON.stringify(turn2.text)} vs api ${JSON.stringify(ref2.text)}`);
    const reused = Number(turn2.stats.match(/\+ (\d+) reused/)?.[1] ?? 0);
    check("turn 2: the prompt reused the KV cache of turn 1", reused > 0, turn2.stats);
    await page.screenshot({ path: screenshot, fullPage: true });

    // the stop button cuts a long reply: the bubble keeps a prefix of the full answer (with this
    // seed, the full answer runs until the context is full: 182 tokens)
    await page.click("#new");
    const user3 = "Tell me everything about compression.";
    const stopSeed = 2;
    const full = await apiReply(base, [{ role: "system", content: SYSTEM }, { role: "user", content: user3 }], 200,
      stopSeed);
    check("stop: the full answer is long (it ends at the context limit)", full.finish === "length",
      `finish ${full.finish}`);
    await page.fill("#seed", String(stopSeed));
    const stopped = await sendMessage(page, user3, 200, { stopAfterFirstPiece: true });
    // streaming shown where it cannot be a race: the page drew part of a 182-token reply and
    // the stop button then cut it (a short reply may arrive in one network read and be drawn once)
    check("stop: the page drew the reply while it streamed", stopped.updates >= 1, `${stopped.updates} updates`);
    check("stop: the reply is marked stopped", stopped.finish === "stopped", `finish ${stopped.finish}`);
    check("stop: the stopped reply is a strict prefix of the full answer",
      full.text.startsWith(stopped.text) && stopped.text.length < full.text.length,
      `${stopped.text.length} of ${full.text.length} characters (full answer finished by ${full.finish})`);
    // the server is still serving after the aborted stream
    const again = await apiReply(base, [{ role: "user", content: user1 }], 8);
    check("the server answers after a stopped stream", typeof again.text === "string");
    check("no script errors on the page", consoleErrors.length === 0, consoleErrors.join(" | "));
  } catch (e) {
    check("the browser run completed", false, e.stack ?? String(e));
  } finally {
    if (browser) await browser.close();
    server.kill("SIGTERM");
    const { code, signal } = await Promise.race([exited,
      new Promise((ok) => setTimeout(() => ok({ code: "timeout" }), 30_000))]);
    check("the server exits 0 on SIGTERM", code === 0, `code ${code} signal ${signal}`);
    if (code === "timeout") server.kill("SIGKILL");
    rmSync(model, { recursive: true, force: true });
  }
  console.log(failures ? `${failures} failed` : "all passed");
  console.log(`screenshot: ${screenshot}`);
  process.exit(failures ? 1 : 0);
}

mkdirSync(dirname(screenshot), { recursive: true });
main();
