import * as assert from "node:assert/strict";
import { beforeEach, test } from "node:test";
import type * as vscode from "vscode";
import { ChatServer, ChatSession, ChatViewProvider, editorContext, FromWebview, ToWebview } from "../../src/chat";
import type { ChatDelta, ChatParams, ChatResult } from "../../src/protocol";
import { FakeUri, reset, state } from "../fakeVscode";

/** A server whose replies the test scripts: `reply` gets the request and a way to stream. */
class ScriptedServer implements ChatServer {
  readonly requests: ChatParams[] = [];
  private listener: ((delta: ChatDelta) => void) | undefined;

  constructor(private readonly reply: (params: ChatParams, token: vscode.CancellationToken, stream: (delta: string) => void) => Promise<ChatResult>) {}

  chat(params: ChatParams, token: vscode.CancellationToken): Promise<ChatResult> {
    this.requests.push(structuredClone(params));
    return this.reply(params, token, (delta) => this.listener?.({ chatId: params.chatId, delta }));
  }

  onChatDelta(listener: (delta: ChatDelta) => void): vscode.Disposable {
    this.listener = listener;
    return { dispose: () => (this.listener = undefined) };
  }

  /** A delta of another conversation, which the session must ignore. */
  strayDelta(): void {
    this.listener?.({ chatId: "someone-else", delta: "stray" });
  }
}

function session(server: ChatServer): { chat: ChatSession; posted: ToWebview[] } {
  const posted: ToWebview[] = [];
  return { chat: new ChatSession(server, (message) => posted.push(message)), posted };
}

const whenCancelled = (token: vscode.CancellationToken) => new Promise<void>((resolve) => token.onCancellationRequested(() => resolve()));

beforeEach(reset);

test("a reply streams as deltas and ends with the server's text", async () => {
  const server = new ScriptedServer(async (params, _token, stream) => {
    stream("Hel");
    server.strayDelta();
    stream("lo");
    return { chatId: params.chatId, text: "Hello", finishReason: "eos" };
  });
  const { chat, posted } = session(server);
  await chat.ask("  Say hello  ", { context: { uri: "file:///a.py" }, label: "a.py" });

  assert.deepEqual(server.requests[0].messages, [{ role: "user", content: "Say hello" }]);
  assert.deepEqual(server.requests[0].context, { uri: "file:///a.py" });
  assert.deepEqual(posted, [
    { type: "turn", turn: { role: "user", text: "Say hello", contextLabel: "a.py" } },
    { type: "busy", busy: true },
    { type: "delta", delta: "Hel" },
    { type: "delta", delta: "lo" },
    { type: "end", turn: { role: "assistant", text: "Hello", note: undefined } },
    { type: "busy", busy: false },
  ]);
  assert.equal(chat.busy, false);
});

test("the next question carries the conversation so far", async () => {
  let n = 0;
  const server = new ScriptedServer(async (params) => ({ chatId: params.chatId, text: `answer ${++n}`, finishReason: "eos" }));
  const { chat } = session(server);
  await chat.ask("first", undefined);
  await chat.ask("second", undefined);
  assert.deepEqual(server.requests[1].messages, [
    { role: "user", content: "first" },
    { role: "assistant", content: "answer 1" },
    { role: "user", content: "second" },
  ]);
  assert.equal(server.requests[1].context, undefined);
  assert.notEqual(server.requests[0].chatId, server.requests[1].chatId);
});

test("Stop cancels the request; a RequestCancelled error keeps the streamed text", async () => {
  const server = new ScriptedServer(async (params, token, stream) => {
    if (server.requests.length > 1) return { chatId: params.chatId, text: "ok", finishReason: "eos" };
    stream("partial");
    await whenCancelled(token);
    throw Object.assign(new Error("cancelled"), { code: -32800 });
  });
  const { chat, posted } = session(server);
  const done = chat.ask("long question", undefined);
  assert.equal(chat.busy, true);
  chat.stop();
  await done;
  assert.deepEqual(posted.at(-2), { type: "end", turn: { role: "assistant", text: "partial", note: "stopped" } });
  // The partial reply was shown, so it is part of the conversation.
  await chat.ask("next", undefined);
  assert.deepEqual(server.requests[1].messages.slice(0, 2), [
    { role: "user", content: "long question" },
    { role: "assistant", content: "partial" },
  ]);
});

test("a cancelled result (finishReason cancelled) is shown as stopped", async () => {
  const server = new ScriptedServer(async (params, token) => {
    await whenCancelled(token);
    return { chatId: params.chatId, text: "so far", finishReason: "cancelled" };
  });
  const { chat, posted } = session(server);
  const done = chat.ask("q", undefined);
  chat.stop();
  await done;
  assert.deepEqual(posted.at(-2), { type: "end", turn: { role: "assistant", text: "so far", note: "stopped" } });
});

test("an error is shown and the failed question is not sent again", async () => {
  let fail = true;
  const server = new ScriptedServer(async (params) => {
    if (fail) throw new Error("unknown role");
    return { chatId: params.chatId, text: "ok", finishReason: "eos" };
  });
  const { chat, posted } = session(server);
  await chat.ask("bad", undefined);
  assert.deepEqual(posted.at(-2), { type: "end", turn: { role: "assistant", text: "", note: "error: unknown role" } });
  fail = false;
  await chat.ask("good", undefined);
  assert.deepEqual(server.requests[1].messages, [{ role: "user", content: "good" }]);
});

test("one question at a time; empty questions are ignored", async () => {
  let finish: (() => void) | undefined;
  const server = new ScriptedServer((params) => new Promise((resolve) => (finish = () => resolve({ chatId: params.chatId, text: "a", finishReason: "eos" }))));
  const { chat } = session(server);
  await chat.ask("   ", undefined);
  const first = chat.ask("one", undefined);
  await chat.ask("two", undefined);
  finish?.();
  await first;
  assert.equal(server.requests.length, 1);
});

test("Clear during a reply cancels it and drops it", async () => {
  const server = new ScriptedServer(async (params, token) => {
    await whenCancelled(token);
    return { chatId: params.chatId, text: "late", finishReason: "cancelled" };
  });
  const { chat, posted } = session(server);
  const done = chat.ask("q", undefined);
  chat.clear();
  await done;
  assert.deepEqual(posted.at(-2), { type: "history", turns: [], busy: true });
  assert.deepEqual(posted.at(-1), { type: "busy", busy: false });
  posted.length = 0;
  chat.replay();
  assert.deepEqual(posted, [{ type: "history", turns: [], busy: false }]);
});

test("a new webview gets the transcript and the reply being streamed", async () => {
  let finish: (() => void) | undefined;
  const server = new ScriptedServer(
    (params, _token, stream) =>
      new Promise((resolve) => {
        stream("half");
        finish = () => resolve({ chatId: params.chatId, text: "half done", finishReason: "eos" });
      }),
  );
  const { chat, posted } = session(server);
  const done = chat.ask("q", undefined);
  posted.length = 0;
  chat.replay();
  assert.deepEqual(posted, [
    {
      type: "history",
      turns: [
        { role: "user", text: "q", contextLabel: undefined },
        { role: "assistant", text: "half" },
      ],
      busy: true,
    },
  ]);
  finish?.();
  await done;
});

function editor(path: string, selection: { start: [number, number]; end: [number, number] }) {
  const [start, end] = [selection.start, selection.end].map(([line, character]) => ({ line, character }));
  return {
    document: { uri: FakeUri.file(path), isUntitled: false, isClosed: false },
    selection: { start, end, isEmpty: start.line === end.line && start.character === end.character },
  } as unknown as vscode.TextEditor;
}

test("the context is the current file, plus the selection when there is one", () => {
  assert.deepEqual(editorContext(editor("/src/app.py", { start: [3, 4], end: [3, 4] })), {
    context: { uri: "file:///src/app.py" },
    label: "app.py",
  });
  assert.deepEqual(editorContext(editor("/src/app.py", { start: [3, 0], end: [7, 2] })), {
    context: { uri: "file:///src/app.py", range: { start: { line: 3, character: 0 }, end: { line: 7, character: 2 } } },
    label: "app.py:4-8",
  });
  assert.equal(editorContext(undefined), undefined);
});

/** A webview view as VS Code hands it to the provider: messages in, messages out. */
function fakeView() {
  let receive: ((message: FromWebview) => void) | undefined;
  const posted: ToWebview[] = [];
  const view = {
    webview: {
      options: {},
      html: "",
      cspSource: "vscode-resource:",
      asWebviewUri: (uri: unknown) => uri,
      onDidReceiveMessage: (listener: (message: FromWebview) => void) => {
        receive = listener;
        return { dispose: () => (receive = undefined) };
      },
      postMessage: async (message: ToWebview) => posted.push(message),
    },
    onDidDispose: () => ({ dispose() {} }),
  };
  return { view: view as unknown as vscode.WebviewView, posted, send: (message: FromWebview) => receive?.(message) };
}

test("the chat view: replays on ready, asks with the editor's context, copies and inserts", async () => {
  const replaced: { selection: unknown; text: string }[] = [];
  const file = editor("/src/app.py", { start: [1, 0], end: [2, 0] });
  Object.assign(file, {
    selections: [file.selection],
    edit: async (build: (edit: { replace(selection: unknown, text: string): void }) => void) => {
      build({ replace: (selection, text) => replaced.push({ selection, text }) });
      return true;
    },
  });
  state.activeTextEditor = file;
  const server = new ScriptedServer(async (params) => ({ chatId: params.chatId, text: "done", finishReason: "eos" }));
  const provider = new ChatViewProvider(FakeUri.file("/ext") as unknown as vscode.Uri, server);
  const { view, posted, send } = fakeView();
  provider.resolveWebviewView(view);
  assert.match(view.webview.html, /Content-Security-Policy/);
  assert.deepEqual(view.webview.options, {
    enableScripts: true,
    localResourceRoots: [FakeUri.file("/ext/out/dist"), FakeUri.file("/ext/media")],
  });

  send({ type: "ready" });
  assert.deepEqual(posted, [{ type: "history", turns: [], busy: false }]);
  send({ type: "ask", text: "why?" });
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(server.requests[0].context, {
    uri: "file:///src/app.py",
    range: { start: { line: 1, character: 0 }, end: { line: 2, character: 0 } },
  });
  assert.deepEqual(posted.at(-2), { type: "end", turn: { role: "assistant", text: "done", note: undefined } });

  send({ type: "copy", text: "x = 1\n" });
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(state.clipboard, "x = 1\n");
  send({ type: "insert", text: "y = 2\n" });
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(replaced, [{ selection: file.selection, text: "y = 2\n" }]);
  provider.dispose();
});
