// Render the maths that pymdownx.arithmatex (generic mode) leaves as \( ... \) in <span class="arithmatex"> and
// \[ ... \] in <div class="arithmatex">, with the KaTeX shipped in assets/katex. The element's whole content is
// replaced, so a displayed formula keeps no stray lines around it.
document.addEventListener("DOMContentLoaded", function () {
  for (const element of document.querySelectorAll(".arithmatex")) {
    const display = element.tagName === "DIV";
    const tex = element.textContent.trim().replace(display ? /^\\\[|\\\]$/g : /^\\\(|\\\)$/g, "");
    katex.render(tex, element, { displayMode: display, throwOnError: false });
  }
});
