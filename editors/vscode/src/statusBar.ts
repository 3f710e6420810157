// The status bar item: what the server is doing (starting, loading with progress, ready, error),
// the model's name, and a click that pauses or resumes completions.
import * as path from "path";
import * as vscode from "vscode";
import type { ServerStatus } from "./protocol";

export type Phase = "untrusted" | "starting" | "running" | "stopped";

/** The part of a $/progress WorkDoneProgress value that is shown. */
export interface LoadProgress {
  title?: string;
  message?: string;
  percentage?: number;
}

export interface StatusView {
  phase: Phase;
  paused: boolean;
  server?: ServerStatus;
  progress?: LoadProgress;
  /** Why the server is not running (phase "stopped"). */
  error?: string;
}

export interface RenderedStatus {
  text: string;
  tooltip: string;
  command: string;
  warning: boolean;
}

export const ToggleCommand = "stablelm.toggle";
export const ShowLogCommand = "stablelm.showLog";
export const ManageTrustCommand = "workbench.trust.manage";

/** Short model name: the folder name of a path, a hub id as is. */
export function modelLabel(status: ServerStatus): string {
  const model = status.model || "model";
  const name = path.isAbsolute(model) || model.startsWith("~") || model.startsWith(".") ? path.basename(model) : model;
  return status.builtin ? `${name} (built-in)` : name;
}

export function renderStatus(view: StatusView): RenderedStatus {
  const { phase, server, progress } = view;
  if (phase === "untrusted") {
    return {
      text: "$(shield) StableLM",
      tooltip: "StableLM is off in this untrusted workspace: trust it, or set stablelm.allowUntrustedWorkspaces in your user settings",
      command: ManageTrustCommand,
      warning: false,
    };
  }
  if (phase === "stopped") {
    return {
      text: "$(error) StableLM",
      tooltip: `The StableLM server is not running${view.error ? `: ${view.error}` : ""}. Click to show its log.`,
      command: ShowLogCommand,
      warning: true,
    };
  }
  if (server?.state === "error") {
    return {
      text: "$(error) StableLM",
      tooltip: `${server.model ? `${modelLabel(server)}: ` : ""}${server.message ?? "the model failed to load"}. Click to show the log.`,
      command: ShowLogCommand,
      warning: true,
    };
  }
  // $/progress only counts while loading: a late report after "ready" must not bring back the spinner.
  if (!server || server.state === "loading") {
    const percent = progress?.percentage !== undefined ? ` ${Math.round(progress.percentage)}%` : "";
    const what = server?.model ? modelLabel(server) : "the model";
    const detail = progress?.message ?? server?.message;
    return {
      text: `$(loading~spin) StableLM${percent}`,
      tooltip: `${phase === "starting" && !server ? "Starting the server" : `Loading ${what}`}${detail ? `: ${detail}` : ""}`,
      command: ToggleCommand,
      warning: false,
    };
  }
  const label = modelLabel(server);
  const where = `${label} on ${server.device} (${server.dtype})`;
  if (view.paused || server.state === "paused") {
    return { text: `$(debug-pause) ${label}`, tooltip: `${where}: completions paused. Click to resume.`, command: ToggleCommand, warning: false };
  }
  return { text: `$(sparkle) ${label}`, tooltip: `${where}. Click to pause completions.`, command: ToggleCommand, warning: false };
}

/** Owns the vscode.StatusBarItem; every change re-renders the whole view. */
export class StatusBar implements vscode.Disposable {
  private readonly item: vscode.StatusBarItem;
  private view: StatusView = { phase: "starting", paused: false };

  constructor() {
    this.item = vscode.window.createStatusBarItem("stablelm.status", vscode.StatusBarAlignment.Right, 100);
    this.item.name = "StableLM";
    this.render();
    this.item.show();
  }

  get state(): Readonly<StatusView> {
    return this.view;
  }

  update(change: Partial<StatusView>): void {
    this.view = { ...this.view, ...change };
    this.render();
  }

  private render(): void {
    const rendered = renderStatus(this.view);
    this.item.text = rendered.text;
    this.item.tooltip = rendered.tooltip;
    this.item.command = rendered.command;
    this.item.backgroundColor = rendered.warning ? new vscode.ThemeColor("statusBarItem.warningBackground") : undefined;
  }

  dispose(): void {
    this.item.dispose();
  }
}
