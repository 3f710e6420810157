// Drives the real Python server over stdio with vscode-jsonrpc (the JSON-RPC library VS Code uses),
// initialized the way the extension does it: the client capabilities computed by the real
// vscode-languageclient (under the fake `vscode` module) and the settings as initializationOptions.
// Covered: model loading with $/progress, inline completion and its accept command,
// cancellation, stablelm/didFocus sent by the extension's FocusReporter and acted on (the
// completion there is ready before it is asked for), chat with streamed deltas and Stop.
//
// Needs STABLELM_TEST_MODEL (a checkpoint folder; editors/test.sh builds a tiny one) and the
// server command (STABLELM_TEST_SERVER, default: the repository's .venv/bin/stablelm-lsp).
import * as assert from "node:assert/strict";
import { ChildProcess, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { after, before, describe, test } from "node:test";
import { pathToFileURL } from "node:url";
import {
  CancellationTokenSource,
  createMessageConnection,
  MessageConnection,
  ProgressType,
  StreamMessageReader,
  StreamMessageWriter,
} from "vscode-jsonrpc/node";
import { LanguageClient } from "vscode-languageclient/node";
import { FocusReporter } from "../../src/focus";
import { FocusNotification } from "../../src/protocol";
import type { ChatDelta, ChatResult, ServerStatus, StatusResult } from "../../src/protocol";
import { serverSettings } from "../../src/settings";

function repositoryRoot(): string {
  let dir = __dirname;
  while (!fs.existsSync(path.join(dir, "pyproject.toml"))) {
    const parent = path.dirname(dir);
    if (parent === dir) throw new Error(`no pyproject.toml above ${__dirname}`);
    dir = parent;
  }
  return dir;
}

const model = process.env.STABLELM_TEST_MODEL;
const serverCommand = process.env.STABLELM_TEST_SERVER?.split(" ") ?? [path.join(repositoryRoot(), ".venv", "bin", "stablelm-lsp"), "--stdio"];
const skip = model ? false : "STABLELM_TEST_MODEL is not set: run editors/test.sh, which builds a tiny checkpoint";

const LOAD_TIMEOUT_MS = 180_000;

interface InlineCompletionItem {
  insertText: string;
  range?: { start: { line: number; character: number }; end: { line: number; character: number } };
  command?: { command: string; arguments?: unknown[] };
}

/** The client side of one server process, with everything the server sent recorded. */
class Session {
  readonly process: ChildProcess;
  readonly connection: MessageConnection;
  readonly statuses: ServerStatus[] = [];
  readonly progress: { token: string | number; value: { kind: string; percentage?: number } }[] = [];
  readonly createdTokens: (string | number)[] = [];
  readonly deltas: ChatDelta[] = [];
  stderr = "";
  /** Rejects when the server process exits: a request it never answers then fails, not hangs. */
  readonly exited: Promise<never>;
  /** Called after every notification from the server. */
  private readonly waiters: (() => void)[] = [];

  constructor(command: string[]) {
    this.process = spawn(command[0], command.slice(1), { stdio: ["pipe", "pipe", "pipe"], env: { ...process.env, PYTHONUNBUFFERED: "1" } });
    this.process.stderr!.on("data", (chunk: Buffer) => (this.stderr += chunk.toString()));
    this.exited = new Promise<never>((_resolve, reject) =>
      this.process.once("exit", (code, signal) => reject(new Error(`the server exited (${code ?? signal}); its stderr:\n${this.stderr}`))),
    );
    this.exited.catch(() => undefined);
    this.connection = createMessageConnection(new StreamMessageReader(this.process.stdout!), new StreamMessageWriter(this.process.stdin!));
    this.connection.onRequest("window/workDoneProgress/create", ({ token }: { token: string | number }) => {
      this.createdTokens.push(token);
      // vscode-jsonrpc hands $/progress to the handler of its token, not to onNotification.
      this.connection.onProgress(new ProgressType<Session["progress"][number]["value"]>(), token, (value) => {
        this.progress.push({ token, value });
        this.wake();
      });
      return null;
    });
    this.connection.onRequest("workspace/configuration", ({ items }: { items: unknown[] }) => items.map(() => null));
    this.connection.onRequest("client/registerCapability", () => null);
    this.connection.onNotification((method: string, params: any) => {
      if (method === "stablelm/status") this.statuses.push(params);
      if (method === "stablelm/chatDelta") this.deltas.push(params);
      this.wake();
    });
    this.connection.listen();
  }

  private wake(): void {
    for (const wake of this.waiters.splice(0)) wake();
  }

  /** Resolves with what `find` returns once it is defined, checked after each notification. */
  async waitFor<T>(what: string, find: () => T | undefined, timeoutMs: number): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = find();
      if (found !== undefined) return found;
      if (Date.now() > deadline || this.process.exitCode !== null) {
        throw new Error(`${what}: not seen in ${timeoutMs} ms; server stderr:\n${this.stderr}`);
      }
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 500).unref();
      });
    }
  }

  /** A request that fails when the server exits before answering. */
  request<T>(method: string, params?: unknown, token?: CancellationTokenSource["token"]): Promise<T> {
    // An undefined token passed on would count as a second parameter: params would go as an array.
    const sent = token ? this.connection.sendRequest<T>(method, params, token) : this.connection.sendRequest<T>(method, params);
    return Promise.race([sent, this.exited]);
  }

  executeCommand<T>(command: string, args: unknown[] = [], token?: CancellationTokenSource["token"]): Promise<T> {
    return this.request("workspace/executeCommand", { command, arguments: args }, token);
  }

  inlineCompletion(uri: string, line: number, character: number, token?: CancellationTokenSource["token"]) {
    return this.request<{ items: InlineCompletionItem[] } | InlineCompletionItem[] | null>(
      "textDocument/inlineCompletion",
      { textDocument: { uri }, position: { line, character }, context: { triggerKind: 2 } },
      token,
    );
  }
}

/** The capabilities the extension's LanguageClient sends in VS Code. */
function vscodeCapabilities(): unknown {
  const client = new LanguageClient("stablelm", "StableLM", { command: "unused" }, { documentSelector: [{ scheme: "file" }] });
  return (client as unknown as { computeClientCapabilities(): unknown }).computeClientCapabilities();
}

/** initializationOptions as the extension sends them, with these settings changed. */
function initializationOptions(changes: Record<string, unknown>) {
  return serverSettings({ get: <T>(key: string) => changes[key] as T | undefined });
}

const itemsOf = (result: { items: InlineCompletionItem[] } | InlineCompletionItem[] | null) =>
  result === null ? [] : Array.isArray(result) ? result : result.items;

const isCancelledError = (error: unknown) => (error as { code?: number }).code === -32800;

describe("the real server through vscode-jsonrpc", { skip }, () => {
  let session: Session;
  let initializeResult: { capabilities: Record<string, any> };
  let ready: ServerStatus;
  const workspace = fs.mkdtempSync(path.join(os.tmpdir(), "stablelm-vscode-"));
  const file = path.join(workspace, "shapes.py");
  const uri = pathToFileURL(file).href;
  const text = ["import math", "", "", "def area(radius):", "    return math.pi * radius", "", "", "def perimeter(radius):", "    return "].join("\n");

  before(async () => {
    fs.writeFileSync(file, text);
    session = new Session(serverCommand);
    initializeResult = await session.request("initialize", {
      processId: process.pid,
      clientInfo: { name: "Visual Studio Code", version: "1.99.0" },
      rootUri: pathToFileURL(workspace).href,
      workspaceFolders: [{ uri: pathToFileURL(workspace).href, name: "w" }],
      capabilities: vscodeCapabilities(),
      initializationOptions: initializationOptions({ model, device: "cpu", dtype: "float32", maxNewTokens: 12, debounceMs: 0 }),
    });
    await session.connection.sendNotification("initialized", {});
    ready = await session.waitFor("a status other than loading", () => session.statuses.find((s) => s.state !== "loading"), LOAD_TIMEOUT_MS);
    await session.connection.sendNotification("textDocument/didOpen", { textDocument: { uri, languageId: "python", version: 1, text } });
  });

  after(async () => {
    if (!session) return;
    const exited = new Promise((resolve) => session.process.once("exit", resolve));
    try {
      await session.request("shutdown");
      await session.connection.sendNotification("exit");
    } finally {
      const timer = setTimeout(() => session.process.kill(), 10_000);
      await exited;
      clearTimeout(timer);
      session.connection.dispose();
      fs.rmSync(workspace, { recursive: true, force: true });
    }
  });

  test("advertises inline completion and the stablelm commands", () => {
    const { capabilities } = initializeResult;
    assert.ok(capabilities.inlineCompletionProvider, "inlineCompletionProvider");
    assert.equal(capabilities.positionEncoding ?? "utf-16", "utf-16");
    for (const command of ["stablelm.chat", "stablelm.status", "stablelm.accepted"]) {
      assert.ok(capabilities.executeCommandProvider.commands.includes(command), command);
    }
  });

  test("loads the model with $/progress on a token it created and reports ready", async () => {
    assert.equal(ready.state, "ready", `status: ${JSON.stringify(ready)}\n${session.stderr}`);
    assert.equal(ready.builtin, false);
    assert.equal(ready.device, "cpu");
    assert.ok(session.createdTokens.length >= 1, "window/workDoneProgress/create");
    const kinds = () => session.progress.filter((p) => session.createdTokens.includes(p.token)).map((p) => p.value.kind);
    // The "end" may come just after the ready status.
    await session.waitFor("$/progress end", () => (kinds().includes("end") ? true : undefined), 10_000);
    assert.equal(kinds()[0], "begin");
    assert.equal(kinds().at(-1), "end");
  });

  test("an inline completion carries the accept command; accepting it is counted", async () => {
    const items = itemsOf(await session.inlineCompletion(uri, 8, 11));
    assert.ok(items.length >= 1, "at least one item");
    const [item] = items;
    assert.equal(typeof item.insertText, "string");
    assert.ok(item.insertText.length > 0);
    assert.equal(item.command?.command, "stablelm.accepted");
    const before = await session.executeCommand<StatusResult>("stablelm.status");
    await session.executeCommand(item.command!.command, item.command!.arguments);
    const after = await session.executeCommand<StatusResult>("stablelm.status");
    assert.equal(after.completionsAccepted, before.completionsAccepted + 1);
    assert.ok(after.completionsShown >= 1);
    assert.equal(after.state, "ready");
  });

  test("a cancelled completion answers RequestCancelled or nothing, and the next one still works", async () => {
    const source = new CancellationTokenSource();
    const cancelled = session.inlineCompletion(uri, 4, 27, source.token);
    source.cancel();
    await cancelled.then(
      (result) => assert.ok(result === null || Array.isArray(itemsOf(result))),
      (error) => assert.ok(isCancelledError(error), String(error)),
    );
    const items = itemsOf(await session.inlineCompletion(uri, 8, 11));
    assert.ok(items.length >= 1);
  });

  test("stablelm/didFocus from the extension's focus reporter prepares that position's completion", async () => {
    const other = pathToFileURL(path.join(workspace, "focused.py")).href;
    await session.connection.sendNotification("textDocument/didOpen", { textDocument: { uri: other, languageId: "python", version: 1, text } });
    const reporter = new FocusReporter((params) => void session.connection.sendNotification(FocusNotification, params));
    reporter.activeEditorChanged({ document: { uri: { toString: () => other } }, selection: { active: { line: 4, character: 27 } } });
    const status = () => session.executeCommand<StatusResult>("stablelm.status");
    // Acted on: the server computes the completion there in the background.
    let before: StatusResult;
    for (const deadline = Date.now() + 60_000; ; ) {
      before = await status();
      if (before.counters.backgroundDone >= 1 && before.counters.backgroundRunning === 0) break;
      assert.ok(Date.now() < deadline, `nothing prepared: ${JSON.stringify(before.counters)}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const items = itemsOf(await session.inlineCompletion(other, 4, 27));
    assert.ok(items.length >= 1);
    const after = await status();
    assert.equal(after.counters.prepared, before.counters.prepared + 1);
    assert.equal(after.counters.modelRuns, before.counters.modelRuns, "the model ran for a prepared position");
  });

  test("a chat reply streams deltas that add up to the result", async () => {
    const chatId = "chat-1";
    const result = await session.executeCommand<ChatResult>("stablelm.chat", [
      { chatId, messages: [{ role: "user", content: "What does area() compute?" }], context: { uri, range: { start: { line: 3, character: 0 }, end: { line: 4, character: 27 } } } },
    ]);
    assert.equal(result.chatId, chatId);
    assert.equal(typeof result.finishReason, "string");
    const streamed = session.deltas.filter((d) => d.chatId === chatId).map((d) => d.delta).join("");
    assert.equal(streamed, result.text);
    assert.ok(result.text.length > 0);
  });

  test("Stop cancels a chat mid-stream and the server stays usable", async () => {
    // A long reply, so that it is still streaming when the first delta arrives.
    await session.connection.sendNotification("workspace/didChangeConfiguration", { settings: { stablelm: { maxNewTokens: 400 } } });
    const chatId = "chat-2";
    const source = new CancellationTokenSource();
    const reply = session.executeCommand<ChatResult>("stablelm.chat", [{ chatId, messages: [{ role: "user", content: "Write a long story." }] }], source.token);
    let replied = false;
    void reply.finally(() => (replied = true)).catch(() => undefined);
    await session.waitFor("the first delta", () => (replied || session.deltas.some((d) => d.chatId === chatId) ? true : undefined), 60_000);
    source.cancel();
    await reply.then(
      (result) => assert.equal(result.finishReason, "cancelled"),
      (error) => assert.ok(isCancelledError(error), String(error)),
    );
    const status = await session.executeCommand<StatusResult>("stablelm.status");
    assert.equal(status.state, "ready");
    await session.connection.sendNotification("workspace/didChangeConfiguration", { settings: { stablelm: { maxNewTokens: 12 } } });
    const items = itemsOf(await session.inlineCompletion(uri, 8, 11));
    assert.ok(items.length >= 1);
  });
});
