// Render the maths that pymdownx.arithmatex (generic mode) leaves as \( ... \) and \[ ... \] in
// <span class="arithmatex"> / <div class="arithmatex">, with the KaTeX shipped in assets/katex.
document.addEventListener("DOMContentLoaded", function () {
  for (const element of document.querySelectorAll(".arithmatex")) {
    renderMathInElement(element, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  }
});
