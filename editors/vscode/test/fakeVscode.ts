// A fake `vscode` module for tests under `node --test` (the real one exists only inside the
// editor). Loaded with `--require`, it answers every `require("vscode")`. The parts this
// extension uses keep state tests can read and drive. Through Proxies, any other capitalised name
// is an empty class (enough for vscode-languageclient's module-level `extends vscode.X`), and any
// other `onDid...` event of a namespace accepts a listener and never fires (enough to construct a
// real LanguageClient and compute the capabilities it sends).
import Module = require("module");
import { CancellationTokenSource, Emitter } from "vscode-jsonrpc";

export interface FakeStatusBarItem {
  id: string;
  text: string;
  tooltip: string | undefined;
  command: string | undefined;
  backgroundColor: unknown;
  name?: string;
  visible: boolean;
  show(): void;
  hide(): void;
  dispose(): void;
}

export class FakeUri {
  constructor(
    readonly scheme: string,
    readonly path: string,
  ) {}
  static file(path: string): FakeUri {
    return new FakeUri("file", path);
  }
  static joinPath(base: FakeUri, ...segments: string[]): FakeUri {
    return new FakeUri(base.scheme, [base.path, ...segments].join("/"));
  }
  get fsPath(): string {
    return this.path;
  }
  toString(): string {
    return `${this.scheme}://${this.path}`;
  }
}

class Disposable {
  constructor(private readonly callOnDispose: () => void) {}
  dispose(): void {
    this.callOnDispose();
  }
}

/** Everything a test can look at or change; `reset()` between tests. */
export const state = {
  isTrusted: true,
  settings: new Map<string, unknown>(),
  statusBarItems: [] as FakeStatusBarItem[],
  logLines: [] as string[],
  messages: [] as string[],
  commands: new Map<string, (...args: unknown[]) => unknown>(),
  executedCommands: [] as string[],
  webviewProviders: new Map<string, unknown>(),
  clipboard: "",
  activeTextEditor: undefined as unknown,
  onDidChangeConfiguration: new Emitter<{ affectsConfiguration(key: string): boolean }>(),
  onDidGrantWorkspaceTrust: new Emitter<void>(),
  onDidChangeActiveTextEditor: new Emitter<unknown>(),
  onDidChangeTextEditorSelection: new Emitter<{ textEditor: unknown }>(),
};

export function reset(): void {
  state.isTrusted = true;
  state.settings.clear();
  state.statusBarItems.length = 0;
  state.logLines.length = 0;
  state.messages.length = 0;
  state.commands.clear();
  state.executedCommands.length = 0;
  state.webviewProviders.clear();
  state.clipboard = "";
  state.activeTextEditor = undefined;
}

/** Sets `stablelm.*` settings and fires onDidChangeConfiguration for the changed keys. */
export function changeSettings(changes: Record<string, unknown>): void {
  for (const [key, value] of Object.entries(changes)) state.settings.set(key, value);
  const keys = Object.keys(changes);
  state.onDidChangeConfiguration.fire({
    affectsConfiguration: (section) => keys.some((key) => key === section || key.startsWith(`${section}.`)),
  });
}

const outputChannel = (name: string) => {
  const line = (level: string) => (message: string) => state.logLines.push(`${level} ${message}`);
  return {
    name,
    info: line("info"),
    warn: line("warn"),
    error: line("error"),
    debug: line("debug"),
    trace: line("trace"),
    append: line("append"),
    appendLine: line("append"),
    show: () => state.executedCommands.push(`show:${name}`),
    hide() {},
    clear() {},
    dispose() {},
    onDidChangeLogLevel: new Emitter<number>().event,
    logLevel: 2,
  };
};

const implemented = {
  __esModule: true,
  // The oldest VS Code package.json accepts (engines.vscode).
  version: "1.91.0",
  Uri: FakeUri,
  Disposable,
  EventEmitter: Emitter,
  CancellationTokenSource,
  ThemeColor: class {
    constructor(readonly id: string) {}
  },
  StatusBarAlignment: { Left: 1, Right: 2 },
  ConfigurationTarget: { Global: 1, Workspace: 2, WorkspaceFolder: 3 },
  workspace: {
    get isTrusted() {
      return state.isTrusted;
    },
    getConfiguration(section: string) {
      return {
        get: <T>(key: string): T | undefined => state.settings.get(`${section}.${key}`) as T | undefined,
        update: async (key: string, value: unknown) => changeSettings({ [`${section}.${key}`]: value }),
      };
    },
    onDidChangeConfiguration: state.onDidChangeConfiguration.event,
    onDidGrantWorkspaceTrust: state.onDidGrantWorkspaceTrust.event,
  },
  window: {
    get activeTextEditor() {
      return state.activeTextEditor;
    },
    onDidChangeActiveTextEditor: state.onDidChangeActiveTextEditor.event,
    onDidChangeTextEditorSelection: state.onDidChangeTextEditorSelection.event,
    createStatusBarItem(id: string): FakeStatusBarItem {
      const item: FakeStatusBarItem = {
        id,
        text: "",
        tooltip: undefined,
        command: undefined,
        backgroundColor: undefined,
        visible: false,
        show: () => void (item.visible = true),
        hide: () => void (item.visible = false),
        dispose: () => void (item.visible = false),
      };
      state.statusBarItems.push(item);
      return item;
    },
    createOutputChannel: outputChannel,
    registerWebviewViewProvider(viewType: string, provider: unknown) {
      state.webviewProviders.set(viewType, provider);
      return new Disposable(() => state.webviewProviders.delete(viewType));
    },
    async showInformationMessage(message: string) {
      state.messages.push(message);
      return undefined;
    },
    async showWarningMessage(message: string) {
      state.messages.push(message);
      return undefined;
    },
    async showErrorMessage(message: string) {
      state.messages.push(message);
      return undefined;
    },
    async showTextDocument() {
      return state.activeTextEditor;
    },
  },
  commands: {
    registerCommand(command: string, callback: (...args: unknown[]) => unknown) {
      if (state.commands.has(command)) throw new Error(`command '${command}' already exists`);
      state.commands.set(command, callback);
      return new Disposable(() => state.commands.delete(command));
    },
    async executeCommand(command: string, ...args: unknown[]) {
      state.executedCommands.push(command);
      return state.commands.get(command)?.(...args);
    },
  },
  env: {
    clipboard: {
      async writeText(text: string) {
        state.clipboard = text;
      },
    },
  },
};

const emptyClasses = new Map<string, unknown>();
const silentEvent = () => new Disposable(() => undefined);

/** A namespace (workspace, window, languages...) whose unknown `on...` members are silent events. */
function namespace(members: Record<string | symbol, unknown>): Record<string | symbol, unknown> {
  return new Proxy(members, {
    get(target, name) {
      if (name in target) return target[name];
      return typeof name === "string" && /^on[A-Z]/.test(name) ? silentEvent : undefined;
    },
  });
}

const namespaces = new Map<string, unknown>();

export const fake = new Proxy(implemented as Record<string | symbol, unknown>, {
  get(target, name) {
    if (typeof name !== "string") return target[name];
    const value = target[name];
    if (value !== undefined && typeof value === "object" && name !== "StatusBarAlignment" && name !== "ConfigurationTarget") {
      if (!namespaces.has(name)) namespaces.set(name, namespace(value as Record<string | symbol, unknown>));
      return namespaces.get(name);
    }
    if (name in target) return value;
    if (/^[A-Z]/.test(name)) {
      if (!emptyClasses.has(name)) emptyClasses.set(name, class {});
      return emptyClasses.get(name);
    }
    if (/^[a-z]/.test(name) && name !== "then") {
      if (!namespaces.has(name)) namespaces.set(name, namespace({}));
      return namespaces.get(name);
    }
    return undefined;
  },
});

type Loader = (request: string, parent: unknown, isMain: boolean) => unknown;
const moduleWithLoad = Module as unknown as { _load: Loader };
const load = moduleWithLoad._load;
moduleWithLoad._load = function (request, parent, isMain) {
  return request === "vscode" ? fake : load.call(this, request, parent, isMain);
};
