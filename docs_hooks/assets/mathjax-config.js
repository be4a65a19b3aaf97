// MathJax 3 configuration for this site (loaded before assets/javascripts/mathjax/tex-svg.js).
//
// Math appears in two places:
//   * Markdown pages: pymdownx.arithmatex (generic) wraps it in <span|div class="arithmatex">
//     with \( \) and \[ \] delimiters;
//   * notebook pages (mkdocs-jupyter): Markdown cells keep $...$ and $$...$$ inside
//     <div class="jupyter-wrapper">.
// Typesetting is scoped to exactly these containers (code blocks and the rest of the page are
// never touched), which also makes the $ delimiters safe.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    skipHtmlTags: ["script", "noscript", "style", "textarea", "pre", "code"],
  },
  startup: {
    typeset: false, // typeset below, scoped, once MathJax is ready
    ready: () => {
      MathJax.startup.defaultReady();
      MathJax.startup.promise.then(typesetScoped);
    },
  },
};

function mathContainers() {
  return Array.from(document.querySelectorAll(".arithmatex, .jupyter-wrapper .jp-RenderedMarkdown"));
}

let typesetContent = null; // the content element typeset last (Material replaces it on navigation)

function typesetScoped() {
  if (!window.MathJax || typeof MathJax.typesetPromise !== "function") {
    return Promise.resolve(); // not loaded yet: startup.ready typesets
  }
  const content = document.querySelector(".md-content") || document.body;
  if (content === typesetContent) {
    return Promise.resolve(); // this page is already typeset
  }
  typesetContent = content;
  // tex-svg.js has no output.clearCache (only the CHTML output does): guard it.
  const output = MathJax.startup && MathJax.startup.output;
  if (output && typeof output.clearCache === "function") {
    output.clearCache();
  }
  MathJax.typesetClear();
  MathJax.texReset();
  return MathJax.typesetPromise(mathContainers());
}

// Material re-emits document$ whenever page content is replaced.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => { typesetScoped(); });
}
