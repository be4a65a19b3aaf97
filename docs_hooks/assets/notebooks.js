// Notebook pages: click a figure to see it full screen, click (or Escape) to close.
document.addEventListener("click", (event) => {
  const img = event.target.closest(".jupyter-wrapper .jp-OutputArea-output img, .jupyter-wrapper img.notebook-figure");
  if (img) img.classList.toggle("notebook-zoomed");
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") document.querySelectorAll("img.notebook-zoomed").forEach((img) => img.classList.remove("notebook-zoomed"));
});
