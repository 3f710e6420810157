// The chat webview's page and script as shipped (chatHtml + the esbuild bundle out/dist/chat.js),
// run in jsdom: what it shows for the messages the extension posts, and what it posts back.
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { beforeEach, test } from "node:test";
import { JSDOM } from "jsdom";
import type * as vscode from "vscode";
import { chatHtml, FromWebview, ToWebview } from "../../src/chat";
import { FakeUri } from "../fakeVscode";

const bundle = fs.readFileSync(path.join(__dirname, "../../../dist/chat.js"), "utf8");

let dom: JSDOM;
let posted: FromWebview[];

const fakeWebview = { cspSource: "vscode-resource:", asWebviewUri: (uri: FakeUri) => uri } as unknown as vscode.Webview;
const byId = <T extends HTMLElement>(id: string) => dom.window.document.getElementById(id) as T;

function send(message: ToWebview): void {
  dom.window.dispatchEvent(new dom.window.MessageEvent("message", { data: message }));
}

beforeEach(() => {
  const html = chatHtml(fakeWebview, FakeUri.file("/ext/out/dist/chat.js") as unknown as vscode.Uri, FakeUri.file("/ext/media/chat.css") as unknown as vscode.Uri);
  dom = new JSDOM(html, { runScripts: "outside-only" });
  posted = [];
  const window = dom.window as unknown as Record<string, unknown>;
  // Messages are serialized on their way to the extension (and out of the page's realm).
  window.acquireVsCodeApi = () => ({ postMessage: (message: FromWebview) => posted.push(JSON.parse(JSON.stringify(message))) });
  dom.window.HTMLElement.prototype.scrollIntoView = () => undefined;
  dom.window.eval(bundle);
});

test("the page allows only its own nonce'd script and the extension's styles", () => {
  const csp = dom.window.document.querySelector('meta[http-equiv="Content-Security-Policy"]')!.getAttribute("content")!;
  const nonce = /script-src 'nonce-([0-9a-f]+)'/.exec(csp)?.[1];
  assert.ok(nonce);
  assert.match(csp, /default-src 'none'/);
  assert.equal(dom.window.document.querySelector("script")!.getAttribute("nonce"), nonce);
  assert.deepEqual(posted, [{ type: "ready" }]);
});

test("a streamed reply renders as markdown; Stop shows while it streams", () => {
  send({ type: "turn", turn: { role: "user", text: "Explain <b>this</b>", contextLabel: "app.py:3-4" } });
  send({ type: "busy", busy: true });
  assert.equal(byId("stop").hidden, false);
  assert.equal(byId("send").hidden, true);
  send({ type: "delta", delta: "Use **map**:\n\n```py\nxs = list(map(f, xs))\n" });
  const reply = dom.window.document.querySelectorAll(".turn.assistant .body")[0];
  assert.match(reply.innerHTML, /<strong>map<\/strong>/);
  assert.equal(reply.querySelector("code.language-py")!.textContent, "xs = list(map(f, xs))\n");
  const question = dom.window.document.querySelector(".turn.user")!;
  assert.equal(question.querySelector(".body")!.textContent, "Explain <b>this</b>");
  assert.equal(question.querySelector(".context")!.textContent, "app.py:3-4");

  byId<HTMLButtonElement>("stop").click();
  assert.deepEqual(posted.at(-1), { type: "stop" });
  send({ type: "end", turn: { role: "assistant", text: "Use **map**:\n\n```py\nxs = list(map(f, xs))\n", note: "stopped" } });
  send({ type: "busy", busy: false });
  assert.equal(byId("send").hidden, false);
  assert.equal(byId("stop").hidden, true);
  assert.equal(reply.querySelector(".note")!.textContent, "(stopped)");
  assert.equal(dom.window.document.querySelectorAll(".turn.assistant").length, 1);
});

test("Copy and Insert post the code block's text", () => {
  send({ type: "history", turns: [{ role: "assistant", text: "```js\nconst a = 1 < 2;\n```" }], busy: false });
  const buttons = dom.window.document.querySelectorAll<HTMLButtonElement>(".code-block button");
  buttons[0].click();
  buttons[1].click();
  assert.deepEqual(posted.slice(-2), [
    { type: "copy", text: "const a = 1 < 2;\n" },
    { type: "insert", text: "const a = 1 < 2;\n" },
  ]);
});

test("Enter sends the question, Shift+Enter does not, Clear asks for a new conversation", () => {
  const question = byId<HTMLTextAreaElement>("question");
  question.value = "first line";
  question.dispatchEvent(new dom.window.KeyboardEvent("keydown", { key: "Enter", shiftKey: true, bubbles: true }));
  assert.equal(posted.length, 1);
  question.dispatchEvent(new dom.window.KeyboardEvent("keydown", { key: "Enter", bubbles: true }));
  assert.deepEqual(posted.at(-1), { type: "ask", text: "first line" });
  assert.equal(question.value, "");
  byId<HTMLButtonElement>("clear").click();
  assert.deepEqual(posted.at(-1), { type: "clear" });
});

test("no question is sent while a reply streams", () => {
  send({ type: "busy", busy: true });
  const question = byId<HTMLTextAreaElement>("question");
  question.value = "too soon";
  question.dispatchEvent(new dom.window.KeyboardEvent("keydown", { key: "Enter", bubbles: true }));
  assert.equal(posted.filter((m) => m.type === "ask").length, 0);
});

test("a re-created view shows the history and continues the reply being streamed", () => {
  send({
    type: "history",
    turns: [
      { role: "user", text: "q" },
      { role: "assistant", text: "partial" },
    ],
    busy: true,
  });
  send({ type: "delta", delta: " reply" });
  const replies = dom.window.document.querySelectorAll(".turn.assistant .body");
  assert.equal(replies.length, 1);
  assert.equal(replies[0].textContent!.trim(), "partial reply");
});
