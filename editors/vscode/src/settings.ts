// Settings of the "stablelm" section: what the server receives (initializationOptions and
// workspace/didChangeConfiguration) and how the server process is started. The defaults come from
// package.json's contributes, so there is one place that states them.
import * as os from "os";
import * as path from "path";
import manifest from "../package.json";

export const SECTION = "stablelm";

/** The settings the server reads, under the names of the protocol. */
export interface ServerSettings {
  model: string;
  endpoint: string;
  endpointKind: string;
  device: string;
  dtype: string;
  speculation: boolean;
  attention: string;
  linear: string;
  decodeStep: string;
  kvDtype: string;
  maxNewTokens: number;
  temperature: number;
  contextTokens: number;
  debounceMs: number;
  debounceMinMs: number;
  anticipate: boolean;
  chatModel: string;
  chatMaxNewTokens: number;
  enabled: boolean;
}

/** Settings that change how the process starts: a change restarts the server. */
export const LAUNCH_SETTINGS = ["serverCommand", "pythonPath"].map((key) => `${SECTION}.${key}`);

/** The part of vscode.WorkspaceConfiguration used here (tests pass a plain object). */
export interface ConfigurationReader {
  get<T>(key: string): T | undefined;
}

type Properties = typeof manifest.contributes.configuration.properties;
const properties: Properties = manifest.contributes.configuration.properties;

function defaultOf(key: string): unknown {
  return (properties as Record<string, { default: unknown }>)[`${SECTION}.${key}`].default;
}

/** The value of `key`, or its default when unset or of the wrong type (a hand-edited settings.json). */
function read<T>(config: ConfigurationReader, key: string, isValid: (value: unknown) => boolean): T {
  const value = config.get<unknown>(key);
  return (value !== undefined && isValid(value) ? value : defaultOf(key)) as T;
}

const isString = (v: unknown) => typeof v === "string";
const isNumber = (v: unknown) => typeof v === "number" && Number.isFinite(v);
const isInteger = (v: unknown) => Number.isInteger(v);
const isBoolean = (v: unknown) => typeof v === "boolean";

export function serverSettings(config: ConfigurationReader): ServerSettings {
  return {
    model: read<string>(config, "model", isString).trim(),
    endpoint: read<string>(config, "endpoint", isString).trim(),
    endpointKind: read(config, "endpointKind", isString),
    device: read(config, "device", isString),
    dtype: read(config, "dtype", isString),
    speculation: read(config, "speculation", isBoolean),
    attention: read(config, "attention", isString),
    linear: read(config, "linear", isString),
    decodeStep: read(config, "decodeStep", isString),
    kvDtype: read(config, "kvDtype", isString),
    maxNewTokens: read(config, "maxNewTokens", isInteger),
    temperature: read(config, "temperature", isNumber),
    contextTokens: read(config, "contextTokens", isInteger),
    debounceMs: read(config, "debounceMs", isInteger),
    debounceMinMs: read(config, "debounceMinMs", isInteger),
    anticipate: read(config, "anticipate", isBoolean),
    chatModel: read<string>(config, "chatModel", isString).trim(),
    chatMaxNewTokens: read(config, "chatMaxNewTokens", isInteger),
    enabled: read(config, "enabled", isBoolean),
  };
}

export interface ServerLaunch {
  command: string;
  args: string[];
}

export class LaunchError extends Error {}

/** `~/x` -> `$HOME/x`: settings are edited by hand and no shell expands them. */
function expandHome(value: string, home: string): string {
  return value === "~" || value.startsWith("~/") ? path.join(home, value.slice(1)) : value;
}

/** The process to start: `pythonPath -m stablelm_lsp.lsp --stdio` when set, else `serverCommand`. */
export function serverLaunch(config: ConfigurationReader, home: string = os.homedir()): ServerLaunch {
  const python = read<string>(config, "pythonPath", isString).trim();
  if (python) {
    return { command: expandHome(python, home), args: ["-m", "stablelm_lsp.lsp", "--stdio"] };
  }
  const isCommandLine = (v: unknown) => Array.isArray(v) && v.every(isString);
  const [command, ...args] = read<string[]>(config, "serverCommand", isCommandLine);
  if (!command || !command.trim()) {
    throw new LaunchError(`${SECTION}.serverCommand is empty: set it, or set ${SECTION}.pythonPath`);
  }
  return { command: expandHome(command.trim(), home), args };
}
