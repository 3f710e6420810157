import * as assert from "node:assert/strict";
import { afterEach, beforeEach, test } from "node:test";
import type * as vscode from "vscode";
import type { LanguageClientOptions, StaticFeature } from "vscode-languageclient/node";
import { State } from "vscode-languageclient/node";
import { activate, deactivate, Extension } from "../../src/extension";
import type { ServerClient } from "../../src/server";
import type { ServerLaunch } from "../../src/settings";
import { changeSettings, FakeUri, state } from "../fakeVscode";
import { reset } from "../fakeVscode";

type Handler = (...args: any[]) => any;
const methodOf = (type: string | { method: string }) => (typeof type === "string" ? type : type.method);

/** Records what the extension does with its LanguageClient; the tests play the server's part. */
class FakeClient {
  running = false;
  readonly notificationsSent: { method: string; params: any }[] = [];
  readonly notificationHandlers = new Map<string, Handler>();
  readonly requestHandlers = new Map<string, Handler>();
  readonly progressHandlers = new Map<string | number, Handler>();
  private readonly features: StaticFeature[] = [];
  private readonly stateListeners: Handler[] = [];

  constructor(
    readonly launch: ServerLaunch,
    readonly options: LanguageClientOptions,
  ) {}

  async start() {
    this.running = true;
    for (const feature of this.features) feature.initialize({}, undefined);
    for (const listener of this.stateListeners) listener({ oldState: State.Starting, newState: State.Running });
  }
  async stop() {
    this.running = false;
    for (const listener of this.stateListeners) listener({ oldState: State.Running, newState: State.Stopped });
  }
  isRunning() {
    return this.running;
  }
  onNotification(type: string | { method: string }, handler: Handler) {
    this.notificationHandlers.set(methodOf(type), handler);
    return { dispose() {} };
  }
  onRequest(type: string | { method: string }, handler: Handler) {
    this.requestHandlers.set(methodOf(type), handler);
    return { dispose() {} };
  }
  onProgress(_type: unknown, token: string | number, handler: Handler) {
    this.progressHandlers.set(token, handler);
    return { dispose: () => this.progressHandlers.delete(token) };
  }
  onDidChangeState(listener: Handler) {
    this.stateListeners.push(listener);
    return { dispose() {} };
  }
  registerFeature(feature: StaticFeature) {
    this.features.push(feature);
  }
  async sendNotification(type: { method: string }, params: any) {
    this.notificationsSent.push({ method: type.method, params });
  }
  async sendRequest(): Promise<any> {
    throw new Error("not used here");
  }
}

let clients: FakeClient[];
let extension: Extension;

/** Lets the extension's async handlers (configuration changes, start) run to completion. */
const settle = () => new Promise((resolve) => setImmediate(resolve));

function start(): Extension {
  const context = { extensionUri: FakeUri.file("/ext"), subscriptions: [] as vscode.Disposable[] } as unknown as vscode.ExtensionContext;
  extension = activate(context, (launch, options) => {
    const client = new FakeClient(launch, options);
    clients.push(client);
    return client as unknown as ServerClient;
  });
  return extension;
}

const statusItem = () => state.statusBarItems.find((item) => item.id === "stablelm.status")!;

beforeEach(() => {
  reset();
  clients = [];
});

afterEach(async () => {
  await deactivate();
  extension.dispose();
});

test("activation starts the server with the settings as initializationOptions", async () => {
  state.settings.set("stablelm.model", "/models/tiny");
  state.settings.set("stablelm.maxNewTokens", 16);
  start();
  await settle();
  assert.equal(clients.length, 1);
  const [client] = clients;
  assert.deepEqual(client.launch, { command: "stablelm-lsp", args: ["--stdio"] });
  assert.equal(client.options.initializationOptions.model, "/models/tiny");
  assert.equal(client.options.initializationOptions.maxNewTokens, 16);
  assert.deepEqual(client.options.documentSelector, [{ scheme: "file" }, { scheme: "untitled" }]);
  assert.ok(client.running);
  for (const command of ["stablelm.toggle", "stablelm.openChat", "stablelm.restart"]) assert.ok(state.commands.has(command), command);
  assert.ok(state.webviewProviders.has("stablelm.chat"));
});

test("an untrusted workspace gets no server until it is trusted", async () => {
  state.isTrusted = false;
  start();
  await settle();
  assert.equal(clients.length, 0);
  assert.match(statusItem().text, /shield/);
  state.isTrusted = true;
  state.onDidGrantWorkspaceTrust.fire();
  await settle();
  assert.equal(clients.length, 1);
});

test("the user setting allowUntrustedWorkspaces starts it anyway", async () => {
  state.isTrusted = false;
  state.settings.set("stablelm.allowUntrustedWorkspaces", true);
  start();
  await settle();
  assert.equal(clients.length, 1);
});

test("$/progress and stablelm/status drive the status bar item", async () => {
  start();
  await settle();
  const [client] = clients;
  client.notificationHandlers.get("stablelm/status")!({ state: "loading", model: "/models/tiny", builtin: false, device: "cpu", dtype: "float32" });
  client.requestHandlers.get("window/workDoneProgress/create")!({ token: "load" });
  client.progressHandlers.get("load")!({ kind: "begin", title: "Loading tiny", percentage: 0 });
  client.progressHandlers.get("load")!({ kind: "report", message: "weights", percentage: 50 });
  assert.equal(statusItem().text, "$(loading~spin) StableLM 50%");
  assert.match(statusItem().tooltip!, /weights/);
  client.progressHandlers.get("load")!({ kind: "end" });
  assert.ok(!client.progressHandlers.has("load"));
  client.notificationHandlers.get("stablelm/status")!({ state: "ready", model: "/models/tiny", builtin: false, device: "cpu", dtype: "float32" });
  assert.equal(statusItem().text, "$(sparkle) tiny");
  assert.equal(statusItem().command, "stablelm.toggle");
});

test("a model that fails to load is reported once, with the server's message", async () => {
  start();
  await settle();
  const status = { state: "error", model: "/models/missing", builtin: false, device: "cpu", dtype: "float32", message: "no config.json" };
  clients[0].notificationHandlers.get("stablelm/status")!(status);
  clients[0].notificationHandlers.get("stablelm/status")!(status);
  assert.deepEqual(state.messages, ["StableLM: /models/missing: no config.json"]);
  assert.equal(statusItem().text, "$(error) StableLM");
});

test("pausing stops inline completion requests; the completion fallback is never asked", async () => {
  start();
  await settle();
  const middleware = clients[0].options.middleware!;
  let asked = 0;
  const next = () => {
    asked += 1;
    return { items: [] };
  };
  const ask = () => middleware.provideInlineCompletionItems!({} as any, {} as any, {} as any, {} as any, next);
  assert.deepEqual(ask(), { items: [] });
  await state.commands.get("stablelm.toggle")!();
  assert.equal(ask(), null);
  assert.equal(asked, 1);
  clients[0].notificationHandlers.get("stablelm/status")!({ state: "ready", model: "m", builtin: true, device: "cpu", dtype: "float32" });
  assert.match(statusItem().text, /debug-pause/);
  await state.commands.get("stablelm.toggle")!();
  ask();
  assert.equal(asked, 2);
  assert.equal(middleware.provideCompletionItem!({} as any, {} as any, {} as any, {} as any, next as any), undefined);
  assert.equal(asked, 2);
});

test("the enabled setting keeps completions off and toggling offers to turn it on", async () => {
  state.settings.set("stablelm.enabled", false);
  start();
  await settle();
  const next = () => ({ items: [] });
  assert.equal(clients[0].options.middleware!.provideInlineCompletionItems!({} as any, {} as any, {} as any, {} as any, next), null);
  await state.commands.get("stablelm.toggle")!();
  assert.match(state.messages[0], /stablelm\.enabled/);
});

test("changed settings are sent as workspace/didChangeConfiguration {settings: {stablelm}}", async () => {
  start();
  await settle();
  changeSettings({ "stablelm.temperature": 0.5, "stablelm.chatModel": "zephyr" });
  await settle();
  const sent = clients[0].notificationsSent.filter((n) => n.method === "workspace/didChangeConfiguration");
  assert.equal(sent.length, 1);
  assert.equal(sent[0].params.settings.stablelm.temperature, 0.5);
  assert.equal(sent[0].params.settings.stablelm.chatModel, "zephyr");
  assert.equal(sent[0].params.settings.stablelm.maxNewTokens, 64);
  assert.equal(clients.length, 1);
});

test("a new server command restarts the server with it", async () => {
  start();
  await settle();
  changeSettings({ "stablelm.serverCommand": ["/opt/venv/bin/stablelm-lsp", "--stdio"] });
  await settle();
  assert.equal(clients.length, 2);
  assert.equal(clients[0].running, false);
  assert.equal(clients[1].running, true);
  assert.equal(clients[1].launch.command, "/opt/venv/bin/stablelm-lsp");
});

test("an empty server command shows the error instead of starting", async () => {
  state.settings.set("stablelm.serverCommand", []);
  start();
  await settle();
  assert.equal(clients.length, 0);
  assert.match(statusItem().tooltip!, /serverCommand is empty/);
  assert.ok(state.logLines.some((line) => /serverCommand is empty/.test(line)));
});

test("a server that stops is shown as stopped", async () => {
  start();
  await settle();
  // Stopped by something else than the extension (a crash, after the client's restarts).
  await clients[0].stop();
  assert.equal(statusItem().text, "$(error) StableLM");
});

test("the esbuild bundle that the .vsix ships loads and activates", async () => {
  const bundle = require("../../../dist/extension.js") as typeof import("../../src/extension");
  state.isTrusted = false;
  const context = { extensionUri: FakeUri.file("/ext"), subscriptions: [] as vscode.Disposable[] } as unknown as vscode.ExtensionContext;
  extension = bundle.activate(context, () => assert.fail("no server in an untrusted workspace"));
  await settle();
  assert.match(statusItem().text, /shield/);
  await bundle.deactivate();
});

test("the cursor's resting place goes to the server as stablelm/didFocus: on switching editors, after a pause, not while paused", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  start();
  await settle();
  const editor = (scheme: string, line: number, character: number) => ({
    document: { uri: new FakeUri(scheme, `/w/a.py`) },
    selection: { active: { line, character } },
  });
  const focused = () => clients[0].notificationsSent.filter((n) => n.method === "stablelm/didFocus").map((n) => n.params);
  state.onDidChangeActiveTextEditor.fire(editor("file", 3, 7));
  assert.deepEqual(focused(), [{ uri: "file:///w/a.py", position: { line: 3, character: 7 } }]);
  // Moving (or typing) reports nothing until the cursor rests.
  state.onDidChangeTextEditorSelection.fire({ textEditor: editor("file", 3, 8) });
  t.mock.timers.tick(300);
  state.onDidChangeTextEditorSelection.fire({ textEditor: editor("file", 3, 9) });
  t.mock.timers.tick(300);
  assert.equal(focused().length, 1);
  t.mock.timers.tick(300);
  assert.deepEqual(focused()[1], { uri: "file:///w/a.py", position: { line: 3, character: 9 } });
  // Documents the server does not have, and a paused extension, send nothing.
  state.onDidChangeActiveTextEditor.fire(editor("git", 1, 1));
  state.onDidChangeTextEditorSelection.fire({ textEditor: editor("output", 1, 1) });
  t.mock.timers.tick(1000);
  await state.commands.get("stablelm.toggle")!();
  state.onDidChangeActiveTextEditor.fire(editor("file", 5, 0));
  assert.equal(focused().length, 2);
});
