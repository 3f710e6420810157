// Bundles what the .vsix ships: the extension host code (CommonJS for Node, `vscode` provided by
// the host) and the chat webview's script (a browser IIFE with markdown-it inside).
import * as esbuild from "esbuild";

const common = { bundle: true, minify: true, sourcemap: true, logLevel: "warning" };

await Promise.all([
  esbuild.build({
    ...common,
    entryPoints: ["src/extension.ts"],
    outfile: "out/dist/extension.js",
    platform: "node",
    format: "cjs",
    target: "node20",
    external: ["vscode"],
  }),
  esbuild.build({
    ...common,
    entryPoints: ["src/webview/main.ts"],
    outfile: "out/dist/chat.js",
    platform: "browser",
    format: "iife",
    target: "es2022",
  }),
]);
