// Entry point: wires the server, the status bar item, the chat view and the commands, and keeps
// the server off in untrusted workspaces unless the user allows it in their own settings.
import * as vscode from "vscode";
import { ChatViewProvider } from "./chat";
import { FocusEditor, FocusReporter } from "./focus";
import { ClientFactory, createLanguageClient, SERVED_SCHEMES, Server } from "./server";
import { LAUNCH_SETTINGS, SECTION } from "./settings";
import { ShowLogCommand, StatusBar } from "./statusBar";

function served(editor: vscode.TextEditor | undefined): FocusEditor | undefined {
  return editor && SERVED_SCHEMES.includes(editor.document.uri.scheme) ? editor : undefined;
}

/** `allowUntrustedWorkspaces` has application scope: a workspace cannot set it for itself. */
function mayStart(): boolean {
  return vscode.workspace.isTrusted || vscode.workspace.getConfiguration(SECTION).get<boolean>("allowUntrustedWorkspaces") === true;
}

export class Extension implements vscode.Disposable {
  readonly statusBar = new StatusBar();
  readonly log = vscode.window.createOutputChannel("StableLM", { log: true });
  readonly server: Server;
  private readonly disposables: vscode.Disposable[] = [];

  constructor(extensionUri: vscode.Uri, createClient: ClientFactory) {
    this.server = new Server(this.statusBar, this.log, createClient);
    const chat = new ChatViewProvider(extensionUri, this.server);
    // Where the cursor rests, so that the server prepares the completion there (stablelm/didFocus).
    const focus = new FocusReporter((params) => this.server.reportFocus(params));
    this.disposables.push(
      focus,
      vscode.window.onDidChangeActiveTextEditor((editor) => focus.activeEditorChanged(served(editor))),
      vscode.window.onDidChangeTextEditorSelection((event) => {
        const editor = served(event.textEditor);
        if (editor) focus.selectionChanged(editor);
      }),
      this.statusBar,
      this.log,
      this.server,
      chat,
      vscode.window.registerWebviewViewProvider(ChatViewProvider.viewType, chat),
      vscode.commands.registerCommand("stablelm.toggle", () => this.toggle()),
      vscode.commands.registerCommand("stablelm.openChat", () => chat.reveal()),
      vscode.commands.registerCommand("stablelm.restart", () => this.restart()),
      vscode.commands.registerCommand(ShowLogCommand, () => this.log.show()),
      vscode.workspace.onDidGrantWorkspaceTrust(() => this.start()),
      vscode.workspace.onDidChangeConfiguration((event) => this.configurationChanged(event)),
    );
  }

  async start(): Promise<void> {
    if (!mayStart()) {
      this.log.info("workspace not trusted: the server is not started (see stablelm.allowUntrustedWorkspaces)");
      this.statusBar.update({ phase: "untrusted" });
      return;
    }
    await this.server.start();
  }

  private async restart(): Promise<void> {
    if (!mayStart()) {
      void vscode.window.showWarningMessage("StableLM does not run in an untrusted workspace unless stablelm.allowUntrustedWorkspaces is set.");
      return;
    }
    await this.server.restart();
  }

  private async toggle(): Promise<void> {
    if (this.server.togglePause()) return;
    const turnOn = "Turn on";
    const answer = await vscode.window.showInformationMessage(`Completions are turned off by the setting ${SECTION}.enabled.`, turnOn);
    if (answer === turnOn) {
      await vscode.workspace.getConfiguration(SECTION).update("enabled", true, vscode.ConfigurationTarget.Global);
    }
  }

  private async configurationChanged(event: vscode.ConfigurationChangeEvent): Promise<void> {
    if (!event.affectsConfiguration(SECTION)) return;
    if (LAUNCH_SETTINGS.some((key) => event.affectsConfiguration(key))) {
      await this.restart();
    } else if (event.affectsConfiguration(`${SECTION}.allowUntrustedWorkspaces`)) {
      if (mayStart()) await this.start();
      else await this.server.stop().then(() => this.statusBar.update({ phase: "untrusted" }));
    } else {
      await this.server.sendSettings();
    }
  }

  dispose(): void {
    for (const disposable of this.disposables.reverse()) disposable.dispose();
  }
}

let active: Extension | undefined;

export function activate(context: vscode.ExtensionContext, createClient: ClientFactory = createLanguageClient): Extension {
  active = new Extension(context.extensionUri, createClient);
  context.subscriptions.push(active);
  void active.start();
  return active;
}

/** VS Code waits for the returned promise: the server gets its shutdown request and exit. */
export function deactivate(): Promise<void> | undefined {
  const server = active?.server;
  active = undefined;
  return server?.stop();
}
