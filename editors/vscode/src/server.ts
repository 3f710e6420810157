// The language server's lifecycle: start, stop, restart, settings sync, pause, and the stablelm/*
// notifications routed to the status bar and the chat view.
import * as vscode from "vscode";
import {
  CancellationToken,
  ClientCapabilities,
  DidChangeConfigurationNotification,
  ExecuteCommandRequest,
  FeatureState,
  LanguageClient,
  LanguageClientOptions,
  NotificationType,
  State,
  StaticFeature,
  WorkDoneProgress,
  WorkDoneProgressCreateRequest,
} from "vscode-languageclient/node";
import {
  ChatDelta,
  ChatDeltaNotification,
  ChatParams,
  ChatResult,
  Commands,
  FocusNotification,
  FocusParams,
  ServerStatus,
  StatusNotification,
} from "./protocol";
import { LaunchError, SECTION, ServerLaunch, serverLaunch, serverSettings } from "./settings";
import { LoadProgress, StatusBar } from "./statusBar";

/** What this file uses of a LanguageClient; tests hand in a fake. */
export type ServerClient = Pick<
  LanguageClient,
  | "start"
  | "stop"
  | "onNotification"
  | "onRequest"
  | "onProgress"
  | "onDidChangeState"
  | "registerFeature"
  | "sendNotification"
  | "sendRequest"
  | "isRunning"
>;

/** Documents the server is given: files and untitled buffers. */
export const SERVED_SCHEMES = ["file", "untitled"];

export type ClientFactory = (launch: ServerLaunch, options: LanguageClientOptions) => ServerClient;

export const createLanguageClient: ClientFactory = (launch, options) =>
  new LanguageClient("stablelm", "StableLM", { command: launch.command, args: launch.args }, options);

/**
 * Shows $/progress of the model load in the status bar item instead of a separate window
 * progress: registered after the built-in progress feature, its create-handler replaces that one.
 */
class LoadProgressFeature implements StaticFeature {
  constructor(
    private readonly client: ServerClient,
    private readonly report: (progress: LoadProgress | undefined) => void,
  ) {}

  fillClientCapabilities(capabilities: ClientCapabilities): void {
    capabilities.window = { ...capabilities.window, workDoneProgress: true };
  }

  initialize(): void {
    this.client.onRequest(WorkDoneProgressCreateRequest.type, ({ token }) => {
      let progress: LoadProgress = {};
      const listener = this.client.onProgress(WorkDoneProgress.type, token, (value) => {
        if (value.kind === "end") {
          listener.dispose();
          this.report(undefined);
          return;
        }
        const title = value.kind === "begin" ? value.title : progress.title;
        progress = { title, message: value.message ?? progress.message, percentage: value.percentage ?? progress.percentage };
        this.report(progress);
      });
    });
  }

  getState(): FeatureState {
    return { kind: "static" };
  }

  clear(): void {}
}

export class Server implements vscode.Disposable {
  private client: ServerClient | undefined;
  private paused = false;
  private readonly deltaListeners = new Set<(delta: ChatDelta) => void>();

  constructor(
    private readonly statusBar: StatusBar,
    private readonly log: vscode.LogOutputChannel,
    private readonly createClient: ClientFactory = createLanguageClient,
  ) {}

  get isRunning(): boolean {
    return this.client?.isRunning() ?? false;
  }

  /** Paused by the user for this session, or turned off by the `enabled` setting. */
  get completionsPaused(): boolean {
    return this.paused || !serverSettings(vscode.workspace.getConfiguration(SECTION)).enabled;
  }

  async start(): Promise<void> {
    if (this.client) {
      return;
    }
    const config = vscode.workspace.getConfiguration(SECTION);
    let launch: ServerLaunch;
    try {
      launch = serverLaunch(config);
    } catch (error) {
      if (!(error instanceof LaunchError)) throw error;
      this.log.error(error.message);
      this.statusBar.update({ phase: "stopped", error: error.message });
      return;
    }
    const client = this.createClient(launch, {
      documentSelector: SERVED_SCHEMES.map((scheme) => ({ scheme })),
      initializationOptions: serverSettings(config),
      outputChannel: this.log,
      middleware: {
        provideInlineCompletionItems: (document, position, context, token, next) =>
          this.completionsPaused ? null : next(document, position, context, token),
        // VS Code shows the inline completions; answering textDocument/completion too (the
        // fallback for clients without inline completion) would run the model twice per keystroke.
        provideCompletionItem: () => undefined,
      },
    });
    client.registerFeature(new LoadProgressFeature(client, (progress) => this.statusBar.update({ progress })));
    client.onNotification(StatusNotification, (status: ServerStatus) => {
      const progress = status.state === "loading" ? this.statusBar.state.progress : undefined;
      const failedNow = status.state === "error" && this.statusBar.state.server?.state !== "error";
      this.statusBar.update({ server: status, progress });
      if (failedNow) void this.reportLoadError(status);
    });
    client.onNotification(ChatDeltaNotification, (delta: ChatDelta) => {
      for (const listener of this.deltaListeners) listener(delta);
    });
    client.onDidChangeState(({ newState }) => {
      if (newState === State.Stopped && this.client === client) {
        this.statusBar.update({ phase: "stopped", server: undefined, progress: undefined });
      } else if (newState === State.Running) {
        this.statusBar.update({ phase: "running", error: undefined });
      }
    });
    this.client = client;
    this.statusBar.update({ phase: "starting", server: undefined, progress: undefined, error: undefined, paused: this.completionsPaused });
    this.log.info(`starting ${[launch.command, ...launch.args].join(" ")}`);
    try {
      await client.start();
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      this.log.error(`the server did not start: ${message}`);
      this.statusBar.update({ phase: "stopped", error: message });
    }
  }

  /** A model that does not load is worth a notification: the status bar alone is easy to miss. */
  private async reportLoadError(status: ServerStatus): Promise<void> {
    const openSettings = "Open Settings";
    const showLog = "Show Log";
    const message = `StableLM: ${status.model ? `${status.model}: ` : ""}${status.message ?? "the model failed to load"}`;
    const answer = await vscode.window.showErrorMessage(message, openSettings, showLog);
    if (answer === openSettings) {
      await vscode.commands.executeCommand("workbench.action.openSettings", SECTION);
    } else if (answer === showLog) {
      this.log.show();
    }
  }

  async stop(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    if (client?.isRunning()) {
      await client.stop();
    }
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.start();
  }

  /** Sends the "stablelm" settings the way the protocol states: {settings: {stablelm: {...}}}. */
  async sendSettings(): Promise<void> {
    this.statusBar.update({ paused: this.completionsPaused });
    if (!this.client?.isRunning()) return;
    const settings = serverSettings(vscode.workspace.getConfiguration(SECTION));
    await this.client.sendNotification(DidChangeConfigurationNotification.type, { settings: { [SECTION]: settings } });
  }

  /** Pauses or resumes completions; returns false when the `enabled` setting keeps them off. */
  togglePause(): boolean {
    if (!serverSettings(vscode.workspace.getConfiguration(SECTION)).enabled) {
      return false;
    }
    this.paused = !this.paused;
    this.statusBar.update({ paused: this.paused });
    return true;
  }

  /** Runs one chat turn; `token` cancelling sends $/cancelRequest. Rejects with the server's error. */
  async chat(params: ChatParams, token: CancellationToken): Promise<ChatResult> {
    if (!this.client?.isRunning()) {
      throw new Error("the StableLM server is not running");
    }
    return this.client.sendRequest(ExecuteCommandRequest.type, { command: Commands.chat, arguments: [params] }, token);
  }

  /** Tells the server where the cursor rests (nothing while completions are paused). */
  reportFocus(params: FocusParams): void {
    if (!this.client?.isRunning() || this.completionsPaused) return;
    this.client.sendNotification(new NotificationType<FocusParams>(FocusNotification), params).catch((error: unknown) => {
      this.log.debug(`${FocusNotification} not sent: ${error instanceof Error ? error.message : String(error)}`);
    });
  }

  onChatDelta(listener: (delta: ChatDelta) => void): vscode.Disposable {
    this.deltaListeners.add(listener);
    return { dispose: () => this.deltaListeners.delete(listener) };
  }

  dispose(): void {
    void this.stop();
  }
}
